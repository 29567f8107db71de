/* The sagepairs embedding explorer: the maps written by analysis/explorer.py, drawn with regl-scatterplot.
 *
 * A classic script (no modules, no fetch) so the page works opened from disk: data/meta.js has set
 * window.SAGEPAIRS_EXPLORER; every other data file is loaded when needed by adding a <script> element, and puts
 * its object in window.SAGEPAIRS_EXPLORER_PARTS[name] (arrays as base64 of little-endian typed arrays).
 * window.explorer is a small hook for tests and benchmarks (see docs/explorer.md).
 */
(function () {
  'use strict';

  const META = window.SAGEPAIRS_EXPLORER;
  const PARTS = (window.SAGEPAIRS_EXPLORER_PARTS = window.SAGEPAIRS_EXPLORER_PARTS || {});
  const TYPES = { '<f4': Float32Array, '<i4': Int32Array, '<u2': Uint16Array, u1: Uint8Array };
  // Tableau 20: categories stay apart on the dark background.
  const PALETTE = ['#4e79a7', '#f28e2b', '#e15759', '#76b7b2', '#59a14f', '#edc948', '#b07aa1', '#ff9da7',
    '#9c755f', '#bab0ac', '#a0cbe8', '#ffbe7d', '#ff9d9a', '#86bcb6', '#8cd17d', '#f1ce63', '#d4a6c8', '#fabfd2',
    '#d7b5a6', '#79706e'];
  const VIRIDIS = ['#440154', '#482878', '#3e4989', '#31688e', '#26828e', '#1f9e89', '#35b779', '#6ece58',
    '#b5de2b', '#fde725'];
  const MISSING_COLOUR = '#5b616b';
  const BINS = 64; // a numeric column is drawn as BINS colour steps (+1 for missing values)
  const LEGEND_MAX = 24;
  const GRID_MAX = 200; // thumbnails shown for a selection
  const ALL_LINKS_MAX = 5000; // the link map joins every pair up to this many; beyond, the hovered and selected
  const SELECTED_LINKS_MAX = 2000;
  const HOVER_LINK_COLOUR = '#ffcc00';

  const $ = (id) => document.getElementById(id);
  const el = {
    title: $('title'), dataset: $('dataset'), mapSelect: $('map-select'), colourSelect: $('colour-select'),
    status: $('status'), plot: $('plot'), canvas: $('canvas'), links: $('links'), legend: $('legend'),
    tooltip: $('tooltip'), sample: $('sample'), count: $('selection-count'), download: $('download-keys'),
    copySql: $('copy-sql'), clear: $('clear-selection'), sql: $('sql'), grid: $('selection-grid'),
    clusterPanel: $('cluster-panel'), clusterSelect: $('cluster-select'), clusters: $('clusters'),
    reset: $('reset-view'),
  };
  const state = {
    scatter: null, map: null, mapIndex: -1, colour: '', columns: {}, keys: null, thumbs: null,
    selection: [], selectionRows: [], hovered: -1, mouse: [0, 0], lastMove: 0, lastUp: 0,
    lastHover: null, lastSelection: null, timings: {}, drawing: Promise.resolve(),
  };

  // ---------------------------------------------------------------------------------------------------------
  // data parts

  const parts = {};

  function loadScript(name) {
    return new Promise((resolve, reject) => {
      const script = document.createElement('script');
      script.src = 'data/' + name + '.js';
      script.onload = () => (PARTS[name] ? resolve(PARTS[name])
        : reject(new Error('data/' + name + '.js did not define part ' + name)));
      script.onerror = () => reject(new Error('could not load data/' + name + '.js'));
      document.head.appendChild(script);
    });
  }

  /** The decoded part `name` (loaded once; the base64 text is dropped once decoded). */
  function part(name, decodeFn) {
    if (!parts[name]) {
      parts[name] = loadScript(name).then((raw) => {
        delete PARTS[name];
        return decodeFn(raw);
      });
    }
    return parts[name];
  }

  function decode(b64, dtype) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new TYPES[dtype](bytes.buffer);
  }

  function identity(m) {
    const rows = new Int32Array(m);
    for (let i = 0; i < m; i++) rows[i] = i;
    return rows;
  }

  function loadMap(index) {
    const spec = META.maps[index];
    return part(spec.part, (raw) => {
      const link = spec.kind === 'link';
      const m = spec.m;
      const rows = raw.rows ? decode(raw.rows, '<i4') : identity(m);
      let xy = link ? new Float32Array(4 * m) : decode(raw.xy, '<f4');
      if (link) {
        xy.set(decode(raw.rgb, '<f4'), 0);
        xy.set(decode(raw.ir, '<f4'), 2 * m);
      }
      const count = link ? 2 * m : m;
      const pointRows = link ? new Int32Array(count) : rows;
      if (link) {
        pointRows.set(rows, 0);
        pointRows.set(rows, m);
      }
      return Object.assign({ spec, link, m, count, rows: pointRows }, normalise(xy, count));
    });
  }

  /** x, y scaled into [-1, 1] keeping the aspect ratio (regl-scatterplot draws normalised coordinates). */
  function normalise(xy, count) {
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (let i = 0; i < count; i++) {
      const x = xy[2 * i], y = xy[2 * i + 1];
      if (x < x0) x0 = x;
      if (x > x1) x1 = x;
      if (y < y0) y0 = y;
      if (y > y1) y1 = y;
    }
    const half = (Math.max(x1 - x0, y1 - y0) / 2) * 1.05 || 1;
    const cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
    const x = new Float32Array(count), y = new Float32Array(count);
    for (let i = 0; i < count; i++) {
      x[i] = (xy[2 * i] - cx) / half;
      y[i] = (xy[2 * i + 1] - cy) / half;
    }
    return { x, y };
  }

  function loadColumn(spec) {
    return part(spec.part, (raw) => {
      const column = spec.kind === 'numeric'
        ? { spec, values: decode(raw.values, spec.dtype) } : { spec, codes: decode(raw.codes, spec.dtype) };
      state.columns[spec.name] = column;
      return column;
    });
  }

  function loadKeys() {
    return part(META.keysPart, (raw) => (state.keys = raw.keys.split('\n')));
  }

  function loadThumbs() {
    if (!META.thumbs) return Promise.resolve(null);
    return part(META.thumbs.part, (raw) => (state.thumbs = {
      atlas: decode(raw.atlas, '<i4'), slot: decode(raw.slot, '<i4'), irRange: decode(raw.irRange, '<f4'),
    }));
  }

  function columnSpec(name) {
    return META.columns.find((c) => c.name === name);
  }

  // ---------------------------------------------------------------------------------------------------------
  // colours and legend

  function hexToRgb(hex) {
    const v = parseInt(hex.slice(1), 16);
    return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
  }

  function gradient(steps) {
    const stops = VIRIDIS.map(hexToRgb);
    const out = [];
    for (let i = 0; i < steps; i++) {
      const t = (i / (steps - 1)) * (stops.length - 1);
      const a = stops[Math.floor(t)], b = stops[Math.min(stops.length - 1, Math.floor(t) + 1)], f = t - Math.floor(t);
      out.push('#' + a.map((v, k) => Math.round(v + (b[k] - v) * f).toString(16).padStart(2, '0')).join(''));
    }
    return out;
  }

  const GRADIENT = gradient(BINS);

  function labelColour(spec, i) {
    return spec.labels[i] === META.missingLabel ? MISSING_COLOUR : PALETTE[i % PALETTE.length];
  }

  /** Per point an integer category (what regl-scatterplot colours by) and the colour of each category. */
  function colourValues(map, name) {
    const values = new Float32Array(map.count);
    const column = state.columns[name];
    if (!column) return { values, colours: ['#8ab4f8'] };
    const spec = column.spec, rows = map.rows;
    if (spec.kind === 'categorical') {
      const codes = column.codes;
      for (let p = 0; p < map.count; p++) values[p] = codes[rows[p]];
      return { values, colours: spec.labels.map((_, i) => labelColour(spec, i)) };
    }
    const v = column.values, lo = spec.min, scale = spec.max > lo ? BINS / (spec.max - lo) : 0;
    for (let p = 0; p < map.count; p++) {
      const value = v[rows[p]];
      values[p] = Number.isNaN(value) ? BINS : Math.min(BINS - 1, Math.floor((value - lo) * scale));
    }
    return { values, colours: GRADIENT.concat([MISSING_COLOUR]) };
  }

  function renderLegend(values) {
    const column = state.columns[state.colour];
    el.legend.textContent = '';
    const title = document.createElement('div');
    title.className = 'title';
    title.textContent = column ? column.spec.name : 'no colour';
    el.legend.appendChild(title);
    if (column && column.spec.kind === 'categorical') legendCategories(column.spec, values);
    else if (column) legendGradient(column.spec);
    if (state.map && state.map.link) legendNote('lines join each sample\'s RGB and IR points');
  }

  function legendEntry(colour, label, count) {
    const entry = document.createElement('div');
    entry.className = 'entry';
    entry.innerHTML = '<span class="swatch"></span><span class="label"></span><span class="count muted"></span>';
    entry.children[0].style.background = colour;
    entry.children[1].textContent = label;
    entry.children[2].textContent = count === undefined ? '' : count.toLocaleString();
    el.legend.appendChild(entry);
  }

  function legendNote(text) {
    const note = document.createElement('div');
    note.className = 'muted note';
    note.textContent = text;
    el.legend.appendChild(note);
  }

  /** Counts on the current map; more than LEGEND_MAX labels: the largest, then how many more. */
  function legendCategories(spec, values) {
    const counts = new Array(spec.labels.length).fill(0);
    for (let p = 0; p < values.length; p++) counts[values[p]]++;
    let shown = spec.labels.map((_, i) => i).filter((i) => counts[i] > 0);
    if (shown.length > LEGEND_MAX) shown = shown.sort((a, b) => counts[b] - counts[a]).slice(0, LEGEND_MAX);
    for (const i of shown) legendEntry(labelColour(spec, i), spec.labels[i], counts[i]);
    const more = spec.labels.filter((_, i) => counts[i] > 0).length - shown.length;
    if (more > 0) legendNote('… and ' + more + ' more');
  }

  function legendGradient(spec) {
    const bar = document.createElement('div');
    bar.className = 'gradient';
    bar.style.background = 'linear-gradient(to right, ' + VIRIDIS.join(', ') + ')';
    const range = document.createElement('div');
    range.className = 'range';
    range.innerHTML = '<span class="min"></span><span class="max"></span>';
    range.children[0].textContent = formatNumber(spec.min);
    range.children[1].textContent = formatNumber(spec.max);
    el.legend.append(bar, range);
    if (spec.missing) legendEntry(MISSING_COLOUR, META.missingLabel, spec.missing);
  }

  function formatNumber(v) {
    if (Number.isNaN(v)) return META.missingLabel;
    return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(4)));
  }

  // ---------------------------------------------------------------------------------------------------------
  // the plot

  function pointSize(count) {
    return count <= 2000 ? 7 : count <= 20000 ? 5 : count <= 200000 ? 3 : 2;
  }

  function createPlot() {
    const largest = Math.max(...META.maps.map((m) => (m.kind === 'link' ? 2 * m.m : m.m)));
    const scatter = window.createScatterplot({
      canvas: el.canvas,
      backgroundColor: '#16181d',
      pointColorHover: '#ffffff',
      pointColorActive: '#00aaff',
      opacityInactiveScale: 0.35,
      lassoColor: '#00aaff',
      lassoMinDelay: 0, // every mouse move extends the lasso: what is drawn is what is selected
      lassoMinDist: 2,
      actionKeyMap: { lasso: 'shift', merge: 'cmd', remove: 'alt' },
      performanceMode: largest > 750000, // square points without blending: 1M points paint in time
    });
    scatter.subscribe('pointover', onPointOver);
    scatter.subscribe('pointout', onPointOut);
    scatter.subscribe('select', ({ points }) => onSelect(points));
    scatter.subscribe('deselect', () => onSelect([]));
    scatter.subscribe('view', drawLinks);
    scatter.subscribe('lassoStart', onPointOut); // a tooltip left up would cover the lasso being drawn
    return scatter;
  }

  /** Ms for the plot to draw one frame (what every hover highlight and selection costs before it shows). */
  function measureFrame() {
    return new Promise((resolve) => {
      const started = performance.now();
      const handler = state.scatter.subscribe('draw', () => {
        state.scatter.unsubscribe('draw', handler);
        resolve(performance.now() - started);
      });
      state.scatter.redraw();
    });
  }

  /** Draws `map` coloured by the current column and makes it the current map once drawn (until then events
   * refer to the old one); no map: recolour the current map, keeping its spatial index. Draws are queued, one at
   * a time, so a recolour asked for during a map change applies to the new map. */
  function drawPoints(newMap) {
    state.drawing = state.drawing.catch(() => {}).then(async () => {
      const scatter = state.scatter, sameMap = !newMap, map = newMap || state.map;
      const { values, colours } = colourValues(map, state.colour);
      scatter.set({ pointColor: colours, colorBy: 'valueA', pointSize: pointSize(map.count),
        opacity: map.count > 200000 ? 0.6 : 0.9 });
      const options = { zDataType: 'categorical' };
      if (sameMap) options.spatialIndex = scatter.get('spatialIndex');
      await scatter.draw({ x: map.x, y: map.y, valueA: values }, options);
      state.map = map;
      if (sameMap && state.selection.length) scatter.select(state.selection, { preventEvent: true });
      renderLegend(values);
      drawLinks();
    });
    return state.drawing;
  }

  async function setMap(index) {
    const map = await loadMap(index);
    state.hovered = -1;
    el.tooltip.hidden = true;
    if (state.map) onSelect([]);
    await drawPoints(map);
    state.mapIndex = index;
    el.mapSelect.value = String(index);
    el.status.textContent = map.count.toLocaleString() + ' points' + (map.link ? ' (' + map.m.toLocaleString()
      + ' RGB + ' + map.m.toLocaleString() + ' IR)' : '') + ' · ' + META.n.toLocaleString() + ' samples';
  }

  async function setColour(name) {
    const spec = columnSpec(name);
    if (spec) await loadColumn(spec);
    state.colour = spec ? name : '';
    el.colourSelect.value = state.colour;
    if (state.map) await drawPoints(null);
  }

  function screenXY(p) {
    const rect = el.canvas.getBoundingClientRect();
    const xy = state.scatter.getScreenPosition(p);
    return [rect.left + xy[0], rect.top + xy[1]];
  }

  /** The link map's lines on a 2-D canvas over the plot: all pairs (when few), the selected, the hovered. */
  function drawLinks() {
    const canvas = el.links, dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const map = state.map;
    if (!map || !map.link) return;
    const m = map.m;
    if (m <= ALL_LINKS_MAX) strokePairs(ctx, identity(m), 'rgba(200, 205, 215, 0.28)', 1);
    const selected = new Set();
    for (const p of state.selection) if (selected.size < SELECTED_LINKS_MAX) selected.add(p % m);
    strokePairs(ctx, selected, 'rgba(0, 170, 255, 0.85)', 1.5);
    if (state.hovered >= 0) strokePairs(ctx, [state.hovered % m], HOVER_LINK_COLOUR, 2.5);
  }

  function strokePairs(ctx, pairs, colour, width) {
    const scatter = state.scatter, m = state.map.m;
    ctx.strokeStyle = colour;
    ctx.lineWidth = width;
    ctx.beginPath();
    for (const i of pairs) {
      const a = scatter.getScreenPosition(i), b = scatter.getScreenPosition(i + m);
      if (!a || !b) continue; // the plot holds another map's points for a moment while a map change draws
      ctx.moveTo(a[0], a[1]);
      ctx.lineTo(b[0], b[1]);
    }
    ctx.stroke();
  }

  // ---------------------------------------------------------------------------------------------------------
  // samples: thumbnails, tooltip, sample panel

  const atlasImages = {};

  /** Resolves once atlas `a` is decoded, so a thumbnail shows in one frame (and hover latency is measurable). */
  function atlasReady(a) {
    if (!atlasImages[a]) {
      const image = new Image();
      image.src = 'thumbs/' + META.thumbs.atlases[a].file;
      atlasImages[a] = image.decode().then(() => image, () => {
        console.error('explorer: could not decode thumbnail atlas thumbs/' + META.thumbs.atlases[a].file);
        return null;
      });
    }
    return atlasImages[a];
  }

  function thumbAtlas(row) {
    return state.thumbs ? state.thumbs.atlas[row] : -1;
  }

  /** The sample's RGB and IR thumbnails side by side: two windows onto its atlas cell (CSS background). */
  function thumbPair(row, width) {
    const pair = document.createElement('div');
    pair.className = 'pair';
    pair.dataset.row = String(row);
    const a = thumbAtlas(row);
    if (a < 0) {
      pair.innerHTML = '<span class="thumb-missing">' + (state.thumbs || !META.thumbs ? 'no thumbnail' : '…')
        + '</span>';
      return pair;
    }
    const [w, h] = META.thumbs.cell, atlas = META.thumbs.atlases[a], perRow = META.thumbs.perRow;
    const slot = state.thumbs.slot[row], col = slot % perRow, line = Math.floor(slot / perRow);
    const scale = width / w;
    for (const k of [0, 1]) {
      const thumb = document.createElement('div');
      thumb.className = 'thumb ' + (k ? 'ir' : 'rgb');
      thumb.style.width = w * scale + 'px';
      thumb.style.height = h * scale + 'px';
      thumb.style.backgroundImage = 'url("thumbs/' + atlas.file + '")';
      thumb.style.backgroundSize = atlas.width * scale + 'px ' + atlas.height * scale + 'px';
      thumb.style.backgroundPosition = -(col * 2 * w + k * w) * scale + 'px ' + -(line * h) * scale + 'px';
      pair.appendChild(thumb);
    }
    return pair;
  }

  function irRangeText(row) {
    if (!state.thumbs) return '';
    const lo = state.thumbs.irRange[2 * row], hi = state.thumbs.irRange[2 * row + 1];
    return Number.isNaN(lo) ? '' : 'IR ' + lo.toFixed(1) + ' to ' + hi.toFixed(1) + ' °C';
  }

  function columnText(column, row) {
    if (column.spec.kind === 'categorical') return column.spec.labels[column.codes[row]];
    return formatNumber(column.values[row]);
  }

  /** Key, thumbnails (each `width` px wide), IR range and every loaded column of sample `row`. */
  function sampleCard(row, point, width) {
    const card = document.createElement('div');
    card.className = 'card';
    card.dataset.row = String(row);
    const key = document.createElement('div');
    key.className = 'key';
    key.textContent = state.keys ? state.keys[row] : 'row ' + row;
    card.appendChild(key);
    if (state.map && state.map.link && point >= 0) {
      const which = document.createElement('div');
      which.className = 'muted modality';
      which.textContent = point < state.map.m ? 'RGB point' : 'IR point';
      card.appendChild(which);
    }
    card.appendChild(thumbPair(row, width));
    const labels = document.createElement('div');
    labels.className = 'thumb-labels';
    labels.innerHTML = '<span class="ir-range"></span>';
    labels.firstChild.textContent = 'RGB | ' + (irRangeText(row) || 'IR');
    card.appendChild(labels);
    const table = document.createElement('table');
    table.className = 'meta';
    for (const spec of META.columns) {
      const column = state.columns[spec.name];
      const tr = table.insertRow();
      tr.insertCell().textContent = spec.name;
      tr.insertCell().textContent = column ? columnText(column, row) : '…';
    }
    card.appendChild(table);
    return card;
  }

  function onPointOver(p) {
    if (!state.map || p >= state.map.count) return;
    const movedAt = state.lastMove, started = performance.now();
    state.hovered = p;
    const row = state.map.rows[p];
    el.tooltip.textContent = '';
    el.tooltip.appendChild(sampleCard(row, p, tooltipWidth()));
    el.tooltip.hidden = false;
    placeTooltip();
    drawLinks();
    const a = thumbAtlas(row);
    const shown = a >= 0 ? atlasReady(a) : Promise.resolve();
    const handlerMs = performance.now() - started;
    shown.then(() => {
      const domMs = performance.now() - movedAt;
      requestAnimationFrame(() => {
        if (state.hovered !== p) return;
        const now = performance.now();
        state.lastHover = { point: p, row, key: state.keys ? state.keys[row] : null, at: now, ms: now - movedAt,
          domMs, handlerMs, eventMs: started - movedAt };
      });
    });
  }

  function onPointOut() {
    state.hovered = -1;
    el.tooltip.hidden = true;
    drawLinks();
  }

  function tooltipWidth() {
    return META.thumbs ? Math.max(64, Math.min(128, 2 * META.thumbs.cell[0])) : 64;
  }

  function placeTooltip() {
    const plot = el.plot.getBoundingClientRect(), tip = el.tooltip;
    let x = state.mouse[0] - plot.left + 14, y = state.mouse[1] - plot.top + 14;
    if (x + tip.offsetWidth > plot.width) x = Math.max(0, x - tip.offsetWidth - 28);
    if (y + tip.offsetHeight > plot.height) y = Math.max(0, plot.height - tip.offsetHeight);
    tip.style.left = x + 'px';
    tip.style.top = y + 'px';
  }

  function showSample(row, point) {
    el.sample.textContent = '';
    el.sample.classList.remove('muted');
    el.sample.appendChild(sampleCard(row, point, META.thumbs ? Math.max(96, META.thumbs.cell[0] * 2) : 96));
  }

  // ---------------------------------------------------------------------------------------------------------
  // selection: count, grid, keys.csv, SQL

  function onSelect(points) {
    const map = state.map, started = performance.now();
    if (!map) return;
    state.selection = Array.from(points);
    const seen = new Uint8Array(META.n), rows = [];
    for (const p of state.selection) {
      const r = map.rows[p];
      if (!seen[r]) {
        seen[r] = 1;
        rows.push(r);
      }
    }
    state.selectionRows = rows.sort((a, b) => a - b);
    if (rows.length === 1) showSample(rows[0], state.selection[0]);
    renderSelection();
    drawLinks();
    const upAt = state.lastUp, done = performance.now();
    requestAnimationFrame(() => {
      const now = performance.now();
      state.lastSelection = { points: state.selection.length, rows: rows.length, at: now, ms: now - upAt,
        domMs: done - upAt, handlerMs: done - started };
    });
  }

  function renderSelection() {
    const rows = state.selectionRows, some = rows.length > 0;
    el.count.classList.toggle('muted', !some);
    el.count.textContent = some ? rows.length.toLocaleString() + ' sample' + (rows.length === 1 ? '' : 's')
      + ' selected' + (state.map && state.map.link ? ' (' + state.selection.length.toLocaleString() + ' points)'
      : '')
      : 'Nothing selected: lasso (shift+drag), box, or click a cluster.';
    el.count.dataset.count = String(rows.length);
    el.download.disabled = el.copySql.disabled = el.clear.disabled = !some;
    el.sql.value = some && rows.length <= 2000 ? sqlPredicate() : '';
    el.grid.textContent = '';
    const width = META.thumbs ? Math.min(48, META.thumbs.cell[0]) : 48;
    for (const row of rows.slice(0, GRID_MAX)) {
      const pair = thumbPair(row, width);
      pair.title = state.keys ? state.keys[row] : '';
      pair.addEventListener('click', () => showSample(row, -1));
      el.grid.appendChild(pair);
    }
    if (rows.length > GRID_MAX) {
      const more = document.createElement('div');
      more.className = 'muted';
      more.textContent = 'showing ' + GRID_MAX + ' of ' + rows.length.toLocaleString();
      el.grid.appendChild(more);
    }
  }

  function selectedKeys() {
    return state.selectionRows.map((r) => state.keys[r]);
  }

  function csvField(text) {
    return /[",\r\n]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
  }

  /** keys.csv: header `key`, one key a row (what `catalog select --keys` reads). */
  function keysCsv() {
    return 'key\n' + selectedKeys().map(csvField).join('\n') + (state.selectionRows.length ? '\n' : '');
  }

  /** The selection as an SQL predicate on the catalog: key IN ('k1', 'k2', ...). */
  function sqlPredicate() {
    const keys = selectedKeys();
    return keys.length ? 'key IN (' + keys.map((k) => "'" + k.replace(/'/g, "''") + "'").join(', ') + ')' : 'FALSE';
  }

  function downloadKeys() {
    const url = URL.createObjectURL(new Blob([keysCsv()], { type: 'text/csv' }));
    const a = document.createElement('a');
    a.href = url;
    a.download = 'keys.csv';
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  function copySql() {
    el.sql.value = sqlPredicate();
    el.sql.select();
    const copied = document.execCommand('copy');
    el.status.textContent = copied ? 'SQL predicate copied (' + state.selectionRows.length.toLocaleString()
      + ' keys)' : 'Select the SQL text and copy it';
  }

  // ---------------------------------------------------------------------------------------------------------
  // clusters

  function renderClusterPanel() {
    const names = Object.keys(META.clusters || {});
    if (!names.length) return;
    el.clusterPanel.hidden = false;
    for (const name of names) el.clusterSelect.add(new Option(name, name));
    el.clusterSelect.value = META.clusterColumn || names[0];
    el.clusterSelect.addEventListener('change', () => renderClusters(el.clusterSelect.value));
    renderClusters(el.clusterSelect.value);
  }

  function renderClusters(name) {
    const spec = columnSpec(name);
    for (const div of el.clusters.children) examplesWhenSeen.unobserve(div);
    el.clusters.textContent = '';
    const clusters = META.clusters[name].slice().sort((a, b) => b.size - a.size);
    for (const cluster of clusters) {
      const div = document.createElement('div');
      div.className = 'cluster';
      div.dataset.code = String(cluster.code);
      div.innerHTML = '<div class="head"><span class="swatch"></span><span class="label"></span>'
        + '<span class="size muted"></span></div><div class="top"></div><div class="grid"></div>';
      div.querySelector('.swatch').style.cssText = 'display:inline-block;width:10px;height:10px;background:'
        + labelColour(spec, cluster.code);
      div.querySelector('.label').textContent = name + ' ' + cluster.label;
      div.querySelector('.size').textContent = cluster.size.toLocaleString() + ' samples ('
        + (100 * cluster.size / META.n).toFixed(1) + '%)';
      div.querySelector('.top').textContent = cluster.top.map(([column, value, share, overall]) =>
        column + ' = ' + value + ' ' + Math.round(100 * share) + '% (all ' + Math.round(100 * overall) + '%)')
        .join(' · ');
      div.addEventListener('click', () => selectCluster(name, cluster.code));
      el.clusters.appendChild(div);
      examplesWhenSeen.observe(div);
    }
  }

  /** A cluster's example thumbnails are drawn when it scrolls into view: with many clusters, the atlases of
   * clusters nobody looks at are never loaded. */
  const examplesWhenSeen = new IntersectionObserver((entries) => {
    for (const entry of entries) {
      if (!entry.isIntersecting) continue;
      const div = entry.target, grid = div.querySelector('.grid');
      const cluster = META.clusters[el.clusterSelect.value].find((c) => String(c.code) === div.dataset.code);
      for (const row of cluster.examples) grid.appendChild(thumbPair(row, 40));
      examplesWhenSeen.unobserve(div);
    }
  }, { root: null, rootMargin: '200px' });

  /** Selects the current map's points of one cluster (through the plot, so it is an ordinary selection). */
  function selectCluster(name, code) {
    const codes = state.columns[name].codes, map = state.map, points = [];
    for (let p = 0; p < map.count; p++) if (codes[map.rows[p]] === code) points.push(p);
    state.scatter.select(points);
  }

  // ---------------------------------------------------------------------------------------------------------
  // start

  function setMode(mode) {
    for (const button of document.querySelectorAll('.modes button')) {
      button.classList.toggle('active', button.dataset.mode === mode);
    }
    state.scatter.set(mode === 'pan' ? { mouseMode: 'panZoom' }
      : { mouseMode: 'lasso', lassoType: mode === 'box' ? 'rectangle' : 'freeform' });
  }

  function defaultColour() {
    if (META.clusterColumn) return META.clusterColumn;
    const categorical = META.columns.find((c) => c.kind === 'categorical');
    return (categorical || META.columns[0] || { name: '' }).name;
  }

  function buildControls() {
    el.title.textContent = META.title;
    document.title = META.title;
    el.dataset.textContent = META.dataset;
    META.maps.forEach((m, i) => el.mapSelect.add(new Option(m.name, String(i))));
    el.colourSelect.add(new Option('(none)', ''));
    for (const c of META.columns) el.colourSelect.add(new Option(c.name, c.name));
    el.mapSelect.addEventListener('change', () => setMap(Number(el.mapSelect.value)).catch(fail));
    el.colourSelect.addEventListener('change', () => setColour(el.colourSelect.value).catch(fail));
    for (const button of document.querySelectorAll('.modes button')) {
      button.addEventListener('click', () => setMode(button.dataset.mode));
    }
    el.download.addEventListener('click', downloadKeys);
    el.copySql.addEventListener('click', copySql);
    el.clear.addEventListener('click', () => state.scatter.deselect());
    el.reset.addEventListener('click', () => state.scatter.reset());
    window.addEventListener('mousemove', (e) => {
      state.lastMove = e.timeStamp;
      state.mouse = [e.clientX, e.clientY];
    }, true);
    window.addEventListener('mouseup', (e) => { state.lastUp = e.timeStamp; }, true);
    window.addEventListener('resize', () => requestAnimationFrame(drawLinks));
  }

  function fail(error) {
    console.error('explorer: ' + (error && error.message ? error.message : error));
    el.status.textContent = 'Error: ' + (error && error.message ? error.message : error);
  }

  async function start() {
    if (!META) throw new Error('data/meta.js is missing or did not set window.SAGEPAIRS_EXPLORER');
    if (typeof window.createScatterplot !== 'function') {
      throw new Error('vendor/regl-scatterplot.min.js is missing or did not set window.createScatterplot');
    }
    buildControls();
    state.scatter = createPlot();
    const colour = defaultColour();
    state.colour = colour;
    el.colourSelect.value = colour;
    if (colour) await loadColumn(columnSpec(colour));
    await setMap(0);
    await new Promise(requestAnimationFrame);
    state.timings.firstPaint = performance.now();
    await Promise.all([loadKeys(), loadThumbs()].concat(META.columns.map(loadColumn)));
    renderClusterPanel();
    state.timings.ready = performance.now();
  }

  const ready = start();
  ready.catch(fail);

  window.explorer = {
    ready,
    timings: state.timings,
    maps: () => META.maps.map((m) => m.name),
    setMap: (name) => setMap(META.maps.findIndex((m) => m.name === name)),
    setColour,
    setMode,
    pointCount: () => state.map.count,
    pointRow: (p) => state.map.rows[p],
    linkPartner: (p) => (p < state.map.m ? p + state.map.m : p - state.map.m),
    pointScreenXY: screenXY,
    pointsScreenXY: () => Array.from({ length: state.map.count }, (_, p) => screenXY(p)),
    selectedPoints: () => state.selection.slice(),
    selectedKeys,
    keysCsv,
    sqlPredicate,
    lastHover: () => state.lastHover,
    lastSelection: () => state.lastSelection,
    measureFrame,
  };
})();
