// One classic script for the explorer page: regl-scatterplot (with regl, pub-sub-es and its other dependencies
// bundled in) on window.createScatterplot; the page opens from file://, where module scripts are blocked.
import createScatterplot from 'regl-scatterplot';

window.createScatterplot = createScatterplot;
