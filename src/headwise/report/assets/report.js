// headwise report: linked views over one atlas. Vanilla JS + SVG/canvas, no network.
// Every piece of text from the data is inserted with textContent (never as markup).
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("headwise-data").textContent);
  var G = D.geometry, L = G.n_layers, H = G.n_heads, KV = G.n_kv_heads, GS = H / KV, N = L * H;
  var NS = "http://www.w3.org/2000/svg";
  var SCORES = D.scores, BY_NAME = {};
  SCORES.forEach(function (s) { BY_NAME[s.name] = s; });
  var LABELS = D.roles.labels;
  // Image models (patches on a grid) get image views instead of the text-only ones (token maps, KV preview).
  var IMAGE = D.modality === "image" && !!G.patch_grid;
  var state = { score: pickDefault(["induction", "previous_token", "retrieval", "attention_distance"]), selected: null,
    role: "", lo: null, hi: null, sortKey: null, sortDir: -1, mapColour: "role", image: 0, query: 0, group: null };
  if (state.sortKey === null) state.sortKey = state.score;

  // ---------- small helpers ----------
  function pickDefault(names) {
    for (var i = 0; i < names.length; i++) if (BY_NAME[names[i]]) return names[i];
    return SCORES.length ? SCORES[0].name : null;
  }
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    if (attrs) for (var k in attrs) if (attrs[k] !== undefined && attrs[k] !== null) e.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function sv(tag, attrs, text) {
    var e = document.createElementNS(NS, tag);
    if (attrs) for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return "\u2013";
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
    return a >= 100 ? v.toFixed(1) : a >= 10 ? v.toFixed(2) : v.toFixed(3);
  }
  function pct(v) { return (100 * v).toFixed(1) + "%"; }
  function bytes(b) {
    var u = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
    return b.toFixed(i ? 2 : 0) + " " + u[i];
  }
  function headName(i) { return "L" + Math.floor(i / H) + ".H" + (i % H); }
  function vals(name) { return BY_NAME[name] ? BY_NAME[name].values : null; }
  function finite(v) { return v !== null && v !== undefined && isFinite(v); }
  function extent(a) {
    var lo = Infinity, hi = -Infinity;
    for (var i = 0; i < a.length; i++) if (finite(a[i])) { if (a[i] < lo) lo = a[i]; if (a[i] > hi) hi = a[i]; }
    return lo <= hi ? [lo, hi] : [0, 1];
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
  // viridis, 9 stops
  var VIR = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141], [39, 173, 129],
    [92, 200, 99], [170, 220, 50], [253, 231, 37]];
  function ramp(stops, t) {
    t = Math.max(0, Math.min(1, t)) * (stops.length - 1);
    var i = Math.min(stops.length - 2, Math.floor(t)), f = t - i, a = stops[i], b = stops[i + 1];
    return [a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1]), a[2] + f * (b[2] - a[2])];
  }
  function rgb(c) { return "rgb(" + Math.round(c[0]) + "," + Math.round(c[1]) + "," + Math.round(c[2]) + ")"; }
  var HEAT = [[255, 255, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];
  var ROLE_COLOURS = ["#e8590c", "#1c7ed6", "#2b8a3e", "#ae3ec9", "#f59f00", "#0ca678", "#e03131", "#5c7cfa",
    "#862e9c", "#a61e4d"];
  var ROLES = [];
  D.roles.rules.forEach(function (r) { if (ROLES.indexOf(r.role) < 0) ROLES.push(r.role); });
  LABELS.forEach(function (rs) { rs.forEach(function (r) { if (ROLES.indexOf(r) < 0) ROLES.push(r); }); });
  function roleColour(r) { var i = ROLES.indexOf(r); return i < 0 ? "#adb5bd" : ROLE_COLOURS[i % ROLE_COLOURS.length]; }
  function primaryRole(i) { return LABELS[i] && LABELS[i].length ? LABELS[i][0] : ""; }

  var tip = el("div", { id: "tooltip" });
  function showTip(ev, lines) {
    tip.textContent = lines.join("\n");
    tip.style.display = "block";
    var x = ev.clientX + 14, y = ev.clientY + 12;
    if (x + 300 > window.innerWidth) x = ev.clientX - 300;
    tip.style.left = x + "px"; tip.style.top = y + "px";
  }
  function hideTip() { tip.style.display = "none"; }
  function decode(q) {
    var s = atob(q.b64), out = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  function kvGroup(head) { return Math.floor(head / GS); }
  function passes(i) {
    if (state.role === "(none)" && LABELS[i].length) return false;
    if (state.role && state.role !== "(none)" && LABELS[i].indexOf(state.role) < 0) return false;
    var v = vals(state.score);
    if (v && (state.lo !== null || state.hi !== null)) {
      if (!finite(v[i])) return false;
      if (state.lo !== null && v[i] < state.lo) return false;
      if (state.hi !== null && v[i] > state.hi) return false;
    }
    return true;
  }

  // ---------- page skeleton ----------
  var app = clear(document.getElementById("app"));
  var errBox = el("div", { id: "error" });
  window.addEventListener("error", function (e) { errBox.style.display = "block"; errBox.textContent = "report error: " + e.message; });
  var header = el("header");
  header.appendChild(el("h1", null, "headwise atlas: " + D.model.spec));
  // Scores computed in a lower precision than float32 say so (atlases from before headwise recorded it: none).
  var DTYPE = D.model.dtype && D.model.dtype !== "float32" ? " \u00b7 " + D.model.dtype : "";
  var sliding = G.layer_types.filter(function (t) { return t === "sliding"; }).length;
  var PREFIX = IMAGE ? G.prefix_tokens || 0 : 0;
  if (IMAGE) {
    header.appendChild(el("span", { "class": "sub" }, L + " layers \u00d7 " + H + " heads (" + G.model_type + ", " +
      G.patch_grid[0] + " \u00d7 " + G.patch_grid[1] + " patches, " + PREFIX + " prefix token" + (PREFIX === 1 ? "" : "s") +
      ")" + (D.model.weights ? " \u00b7 weights " + D.model.weights : "") + DTYPE));
  } else {
    header.appendChild(el("span", { "class": "sub" }, L + " layers \u00d7 " + H + " heads, " + KV + " KV head" +
      (KV > 1 ? "s" : "") + " per layer (" + G.model_type + (sliding ? ", " + sliding + " sliding-window layers" : "") +
      ")" + (D.model.weights ? " \u00b7 weights " + D.model.weights : "") + DTYPE));
  }
  var scoreSel = el("select", { id: "score-select" });
  SCORES.forEach(function (s) { var o = el("option", { value: s.name }, s.name); o.title = s.description; scoreSel.appendChild(o); });
  scoreSel.value = state.score;
  var lab = el("label", null, "colour by ");
  lab.appendChild(scoreSel);
  header.appendChild(lab);
  app.appendChild(header);
  app.appendChild(errBox);
  var layout = el("div", { "class": IMAGE ? "layout image" : "layout" });
  app.appendChild(layout);
  app.appendChild(tip);
  function panel(id, title) {
    var p = el("section", { "class": "panel", id: id });
    p.appendChild(el("h2", null, title));
    layout.appendChild(p);
    return p;
  }
  var gridP = panel("grid-panel", "Head grid"), mapP = panel("map-panel", "Pattern map"),
    detailP = panel("detail-panel", "Head detail"), tableP = panel("table-panel", "Ranking"),
    trendsP = panel("trends-panel", "Layer trends");
  // The KV-cache preview is about a language model's cache; an image model gets its image views instead.
  var kvP = IMAGE ? null : panel("kv-panel", "KV-cache preview");
  var imagesP = IMAGE ? panel("images-panel", "Attention over images") : null;
  var impP = D.importance ? panel("importance-panel", "Importance") : null;

  // ---------- 1. head grid ----------
  var cell = Math.max(9, Math.min(26, Math.floor(520 / (H + (KV > 1 ? KV - 1 : 0) * 0.4))));
  cell = Math.min(cell, Math.max(9, Math.floor(760 / L)));
  var gap = KV > 1 && KV < H ? Math.max(3, Math.round(cell * 0.4)) : 0;
  var left = 44, top = KV > 1 && KV < H ? 28 : 14;
  var gw = left + H * cell + (KV - 1) * gap + 4, gh = top + L * cell + 4;
  var gridSvg = sv("svg", { width: gw, height: gh, id: "grid" });
  var cells = [];
  function cellX(h) { return left + h * cell + (gap ? kvGroup(h) * gap : 0); }
  if (gap) {
    for (var k = 0; k < KV; k++) {
      var x0 = cellX(k * GS), x1 = cellX((k + 1) * GS - 1) + cell;
      gridSvg.appendChild(sv("text", { x: (x0 + x1) / 2, y: 10, "text-anchor": "middle" }, "KV " + k));
      gridSvg.appendChild(sv("path", { d: "M" + x0 + " 20 V16 H" + (x1 - 1) + " V20", fill: "none", stroke: "#adb5bd" }));
    }
  }
  var headLabelStep = Math.ceil(12 / cell);
  for (var l = 0; l < L; l++) {
    if (l % Math.ceil(11 / cell) === 0) {
      var t = sv("text", { x: left - 4, y: top + l * cell + cell * 0.7, "text-anchor": "end" },
        "L" + l + (G.layer_types[l] === "sliding" ? " \u00b7w" : ""));
      gridSvg.appendChild(t);
    }
    for (var h = 0; h < H; h++) {
      var i = l * H + h;
      var r = sv("rect", { x: cellX(h), y: top + l * cell, width: cell, height: cell, "class": "cell",
        "data-layer": l, "data-head": h, "data-index": i });
      cells.push(r);
      gridSvg.appendChild(r);
      var roles = LABELS[i];
      for (var b = 0; b < Math.min(3, roles.length) && cell >= 12; b++) {
        gridSvg.appendChild(sv("circle", { cx: cellX(h) + cell - 4 - b * 5, cy: top + l * cell + cell - 4, r: 2.2,
          fill: roleColour(roles[b]), stroke: "#fff", "stroke-width": 0.6, "pointer-events": "none" }));
      }
    }
  }
  if (headLabelStep <= H) {
    for (var hh = 0; hh < H; hh += headLabelStep) {
      if (!gap) gridSvg.appendChild(sv("text", { x: cellX(hh) + cell / 2, y: top - 3, "text-anchor": "middle" }, hh));
    }
  }
  gridSvg.addEventListener("mousemove", function (ev) {
    var i = ev.target.getAttribute && ev.target.getAttribute("data-index");
    if (i === null || i === undefined) { hideTip(); return; }
    i = +i;
    var lines = [headName(i) + (IMAGE ? "" : "  (KV head " + kvGroup(i % H) + ", " + G.layer_types[Math.floor(i / H)] + " layer)")];
    SCORES.forEach(function (s) { lines.push((s.name === state.score ? "\u25b6 " : "  ") + s.name + ": " + fmt(s.values[i])); });
    lines.push("roles: " + (LABELS[i].join(", ") || "none"));
    showTip(ev, lines);
  });
  gridSvg.addEventListener("mouseleave", hideTip);
  gridSvg.addEventListener("click", function (ev) {
    var i = ev.target.getAttribute && ev.target.getAttribute("data-index");
    if (i !== null && i !== undefined) select(+i, "grid");
  });
  gridP.appendChild(gridSvg);
  var colourbar = el("div", { "class": "caption", id: "colourbar" });
  gridP.appendChild(colourbar);
  var roleLegend = el("div", { "class": "legend" });
  ROLES.forEach(function (r) {
    var s = el("span");
    var sw = el("span", { "class": "sw" });
    sw.style.background = roleColour(r);
    s.appendChild(sw);
    var count = LABELS.filter(function (x) { return x.indexOf(r) >= 0; }).length;
    s.appendChild(document.createTextNode(r + " (" + count + ")"));
    roleLegend.appendChild(s);
  });
  gridP.appendChild(roleLegend);
  gridP.appendChild(el("div", { "class": "caption" }, "Rows are layers, columns query heads" +
    (gap ? ", grouped by the KV head they share" : "") + "; dots are role badges. Hover for values, click to select." +
    (sliding ? " \u00b7w marks sliding-window layers." : "")));

  function colourGrid() {
    var v = vals(state.score);
    var ex = v ? extent(v) : [0, 1];
    for (var i = 0; i < N; i++) {
      var c = v && finite(v[i]) ? rgb(ramp(VIR, (v[i] - ex[0]) / ((ex[1] - ex[0]) || 1))) : "#dee2e6";
      cells[i].setAttribute("fill", c);
      cells[i].classList.toggle("dim", !passes(i));
    }
    gridSvg.setAttribute("data-score", state.score || "");
    clear(colourbar);
    var bar = el("canvas", { width: 120, height: 8 });
    var ctx = bar.getContext("2d");
    for (var x = 0; x < 120; x++) { ctx.fillStyle = rgb(ramp(VIR, x / 119)); ctx.fillRect(x, 0, 1, 8); }
    colourbar.appendChild(document.createTextNode((state.score || "no score") + ": " + fmt(ex[0]) + " "));
    colourbar.appendChild(bar);
    colourbar.appendChild(document.createTextNode(" " + fmt(ex[1])));
    if (BY_NAME[state.score] && BY_NAME[state.score].description) {
      colourbar.appendChild(el("div", null, BY_NAME[state.score].description));
    }
  }

  // ---------- 4. pattern map ----------
  // Layouts: the pattern summary's own (autoencoder, PCA of the maps; scores/autoencoder.py), when the atlas has
  // them, and the report's PCA of attention-mass features (layout.py), always.
  var LAYOUTS = (D.pattern_layouts || []).slice();
  LAYOUTS.push({ name: "features", label: "attention-mass features (PCA)", x: D.layout.x, y: D.layout.y, group: null,
    records: [], settings: {}, method: D.layout.method + " (" + D.layout.features.length + " features: " +
      D.layout.features.join(", ") + "). PC1 explains " + pct(D.layout.explained[0]) + ", PC2 " +
      pct(D.layout.explained[1]) + " of the variance." });
  var LAY = LAYOUTS[0];
  var GROUP_COLOURS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666",
    "#1f78b4", "#b2df8a"];
  function groupColour(g) { return g === null || g === undefined ? "#dee2e6" : GROUP_COLOURS[g % GROUP_COLOURS.length]; }
  var MW = 420, MH = 340, pad = 14;
  var mapSvg = sv("svg", { width: MW, height: MH, id: "pattern-map", viewBox: "0 0 " + MW + " " + MH });
  var pts = [];
  mapSvg.appendChild(sv("rect", { x: 0, y: 0, width: MW, height: MH, fill: "#fbfbfc", stroke: "#e9ecef" }));
  for (var p = 0; p < N; p++) {
    var c = sv("circle", { r: N > 2000 ? 2.5 : 4, "class": "pt", "data-index": p });
    pts.push(c);
    mapSvg.appendChild(c);
  }
  function placePoints() {
    var xs = LAY.x, ys = LAY.y, exX = extent(xs), exY = extent(ys);
    for (var i = 0; i < N; i++) {
      pts[i].setAttribute("cx", pad + (xs[i] - exX[0]) / ((exX[1] - exX[0]) || 1) * (MW - 2 * pad));
      pts[i].setAttribute("cy", MH - pad - (ys[i] - exY[0]) / ((exY[1] - exY[0]) || 1) * (MH - 2 * pad));
    }
    mapSvg.setAttribute("data-layout", LAY.name);
  }
  mapSvg.addEventListener("mousemove", function (ev) {
    var i = ev.target.getAttribute && ev.target.getAttribute("data-index");
    if (i === null || i === undefined) { hideTip(); return; }
    i = +i;
    var lines = [headName(i), "roles: " + (LABELS[i].join(", ") || "none"), state.score + ": " + fmt(vals(state.score)[i])];
    if (LAY.group) lines.push("group " + (LAY.group[i] === null ? "\u2013" : LAY.group[i]));
    showTip(ev, lines);
  });
  mapSvg.addEventListener("mouseleave", hideTip);
  mapSvg.addEventListener("click", function (ev) {
    var i = ev.target.getAttribute && ev.target.getAttribute("data-index");
    if (i !== null && i !== undefined) select(+i, "map");
  });
  var mapCtl = el("div", { "class": "controls" });
  var layoutSel = el("select", { id: "layout-select" });
  LAYOUTS.forEach(function (x) { layoutSel.appendChild(el("option", { value: x.name }, x.label)); });
  layoutSel.addEventListener("change", function () {
    LAY = LAYOUTS.filter(function (x) { return x.name === layoutSel.value; })[0] || LAYOUTS[0];
    state.group = null;
    if (state.mapColour === "group" && !LAY.group) state.mapColour = mapColSel.value = "role";
    placePoints(); colourMap(); renderGroups();
  });
  if (LAYOUTS.length > 1) {
    var llab = el("label", null, "layout ");
    llab.appendChild(layoutSel);
    mapCtl.appendChild(llab);
  }
  var mapColSel = el("select", { id: "map-colour" });
  mapColSel.appendChild(el("option", { value: "role" }, "role"));
  mapColSel.appendChild(el("option", { value: "score" }, "selected score"));
  mapColSel.appendChild(el("option", { value: "layer" }, "layer"));
  if (LAYOUTS.length > 1) mapColSel.appendChild(el("option", { value: "group" }, "pattern group"));
  mapColSel.addEventListener("change", function () { state.mapColour = mapColSel.value; colourMap(); });
  var mlab = el("label", null, "colour points by ");
  mlab.appendChild(mapColSel);
  mapCtl.appendChild(mlab);
  mapP.appendChild(mapCtl);
  mapP.appendChild(mapSvg);
  var mapLegend = el("div", { "class": "legend" });
  mapP.appendChild(mapLegend);
  var mapCaption = el("div", { "class": "caption", id: "map-caption" });
  mapP.appendChild(mapCaption);
  var shareBox = el("div", { "class": "caption", id: "neighbour-share" });
  if (LAYOUTS.length > 1) mapP.appendChild(shareBox);
  var groupsBox = el("div", { "class": "groups", id: "pattern-groups" });
  mapP.appendChild(groupsBox);

  // Share of (head, neighbour) pairs, over each head's k nearest neighbours in this 2D layout (Euclidean, ties by
  // index), whose role labels intersect, a head without a label counting as "none": scores/autoencoder.py
  // neighbour_role_agreement and layout.py neighbour_role_share, applied to the coordinates shown.
  function labelSet(i) { return LABELS[i].length ? LABELS[i] : ["none"]; }
  function meets(a, b) { for (var x = 0; x < a.length; x++) if (b.indexOf(a[x]) >= 0) return true; return false; }
  function neighbourShare(xs, ys, k) {
    if (N < 2) return [NaN, NaN];
    k = Math.min(k, N - 1);
    var agree = 0;
    for (var i = 0; i < N; i++) {
      // the k nearest, kept sorted; scanning j upwards and inserting only before a strictly farther one keeps
      // the lower index first among equal distances (numpy's stable argsort)
      var bestD = [], bestJ = [];
      for (var j = 0; j < N; j++) {
        if (j === i) continue;
        var dx = xs[i] - xs[j], dy = ys[i] - ys[j], d = Math.sqrt(dx * dx + dy * dy);
        if (bestD.length === k && d >= bestD[k - 1]) continue;
        var at = bestD.length;
        while (at > 0 && bestD[at - 1] > d) at--;
        bestD.splice(at, 0, d); bestJ.splice(at, 0, j);
        if (bestD.length > k) { bestD.pop(); bestJ.pop(); }
      }
      for (var n = 0; n < k; n++) if (meets(labelSet(i), labelSet(bestJ[n]))) agree++;
    }
    // by chance: pairs of distinct heads, counted per distinct label set
    var kinds = {}, keys = [];
    for (var h = 0; h < N; h++) {
      var key = JSON.stringify(labelSet(h).slice().sort());
      if (!kinds[key]) { kinds[key] = { set: labelSet(h), n: 0 }; keys.push(key); }
      kinds[key].n++;
    }
    var same = 0;
    for (var a = 0; a < keys.length; a++) for (var b = a; b < keys.length; b++) {
      var A = kinds[keys[a]], B = kinds[keys[b]];
      if (meets(A.set, B.set)) same += a === b ? A.n * (A.n - 1) / 2 : A.n * B.n;
    }
    return [agree / (N * k), same / (N * (N - 1) / 2)];
  }
  var shareCache = {};
  function renderShare() {
    clear(shareBox);
    var sh = shareCache[LAY.name] || (shareCache[LAY.name] = neighbourShare(LAY.x, LAY.y, 3));
    shareBox.setAttribute("data-share", sh[0]);
    shareBox.setAttribute("data-chance", sh[1]);
    var reported = LAY.settings && typeof LAY.settings.neighbour_role_agreement === "number" ?
      "; the pattern summary reports " + pct(LAY.settings.neighbour_role_agreement) + " in its own space" : "";
    shareBox.appendChild(document.createTextNode("A head's 3 nearest neighbours in this 2D layout share a role label " +
      "(no role counts as one) for " + pct(sh[0]) + " of (head, neighbour) pairs; by chance " + pct(sh[1]) + reported + "."));
  }

  function colourMap() {
    var v = vals(state.score), ex = v ? extent(v) : [0, 1];
    var inGroup = null;
    if (state.group !== null && LAY.group) inGroup = function (i) { return LAY.group[i] === state.group; };
    clear(mapLegend);
    for (var i = 0; i < N; i++) {
      var col;
      if (state.mapColour === "role") col = roleColour(primaryRole(i));
      else if (state.mapColour === "layer") col = rgb(ramp(VIR, Math.floor(i / H) / Math.max(1, L - 1)));
      else if (state.mapColour === "group") col = groupColour(LAY.group ? LAY.group[i] : null);
      else col = v && finite(v[i]) ? rgb(ramp(VIR, (v[i] - ex[0]) / ((ex[1] - ex[0]) || 1))) : "#dee2e6";
      pts[i].setAttribute("fill", col);
      pts[i].classList.toggle("dim", !passes(i) || (inGroup !== null && !inGroup(i)));
    }
    if (state.mapColour === "role") {
      ROLES.concat([""]).forEach(function (r) {
        var s = el("span"), sw = el("span", { "class": "sw" });
        sw.style.background = roleColour(r);
        s.appendChild(sw);
        s.appendChild(document.createTextNode(r || "no role"));
        mapLegend.appendChild(s);
      });
    } else if (state.mapColour === "group") {
      mapLegend.appendChild(document.createTextNode(LAY.group ? "colours: the groups below" :
        "this layout has no groups"));
    } else {
      mapLegend.appendChild(document.createTextNode(state.mapColour === "layer" ? "dark: layer 0, yellow: layer " +
        (L - 1) : "dark: low " + state.score + ", yellow: high"));
    }
    clear(mapCaption);
    mapCaption.appendChild(document.createTextNode(LAY.name === "features" ? LAY.method + " Nearby heads attend alike. " +
      "Click a point to select its head." : LAY.description + ". " + LAY.method + ". Nearby heads attend alike; click a " +
      "point to select its head."));
    if (LAYOUTS.length > 1) renderShare();
  }

  // Each group of the pattern summary: the decoder's map of its centroid and its heads' mean input map.
  function renderGroups() {
    clear(groupsBox);
    if (!LAY.records || !LAY.records.length) return;
    groupsBox.appendChild(el("div", { "class": "caption" }, "Pattern groups: the decoded centroid (left) and the mean " +
      "map of the group's heads (right)" + (IMAGE ? ", over the patch grid." : ", a pooled query \u00d7 key map.") +
      " Click a group to pick out its heads on the map."));
    LAY.records.forEach(function (r) {
      var box = el("div", { "class": "group" + (state.group === r.group ? " cur" : ""), "data-group": r.group });
      var t = el("div", { "class": "t" });
      var sw = el("span", { "class": "sw" });
      sw.style.background = groupColour(r.group);
      t.appendChild(sw);
      t.appendChild(document.createTextNode("group " + r.group + " \u00b7 " + r.heads.length + " head" +
        (r.heads.length === 1 ? "" : "s")));
      box.appendChild(t);
      [["decoded", r.decoded], ["mean", r.mean_map]].forEach(function (m) {
        var cv = gridCanvas(decode(m[1]), 0, r.side[0], r.side[1], HEAT, "group-map");
        cv.title = m[0] + " map of group " + r.group + " (peak " + fmt(m[1].max[0]) + ")";
        box.appendChild(cv);
      });
      box.addEventListener("mousemove", function (ev) {
        showTip(ev, ["group " + r.group + ": " + r.heads.slice(0, 12).map(function (x) { return "L" + x[0] + ".H" + x[1]; })
          .join(", ") + (r.heads.length > 12 ? ", \u2026" : "")]);
      });
      box.addEventListener("mouseleave", hideTip);
      box.addEventListener("click", function () {
        state.group = state.group === r.group ? null : r.group;
        colourMap(); renderGroups();
      });
      groupsBox.appendChild(box);
    });
  }
  // A rows x cols canvas of q (uint8, sqrt-scaled) starting at offset, drawn with `stops`.
  function gridCanvas(q, offset, rows, cols, stops, cls) {
    var cv = el("canvas", { width: cols, height: rows, "class": cls });
    var ctx = cv.getContext("2d"), img = ctx.createImageData(cols, rows);
    for (var a = 0; a < rows * cols; a++) {
      var col = ramp(stops, q[offset + a] / 255);
      img.data[4 * a] = col[0]; img.data[4 * a + 1] = col[1]; img.data[4 * a + 2] = col[2]; img.data[4 * a + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    return cv;
  }

  // ---------- 2. ranking table ----------
  var tctl = el("div", { "class": "controls" });
  var roleSel = el("select", { id: "role-filter" });
  roleSel.appendChild(el("option", { value: "" }, "any role"));
  ROLES.forEach(function (r) { roleSel.appendChild(el("option", { value: r }, r)); });
  roleSel.appendChild(el("option", { value: "(none)" }, "no role"));
  var loIn = el("input", { type: "number", step: "any", id: "range-lo", placeholder: "min" });
  var hiIn = el("input", { type: "number", step: "any", id: "range-hi", placeholder: "max" });
  var rl = el("label", null, "role ");
  rl.appendChild(roleSel);
  tctl.appendChild(rl);
  var rangeLabel = el("label", null, "");
  tctl.appendChild(rangeLabel);
  tctl.appendChild(loIn);
  tctl.appendChild(document.createTextNode("\u2013"));
  tctl.appendChild(hiIn);
  var tcount = el("span", { "class": "caption" });
  tctl.appendChild(tcount);
  tableP.appendChild(tctl);
  function readRange() {
    state.lo = loIn.value === "" ? null : +loIn.value;
    state.hi = hiIn.value === "" ? null : +hiIn.value;
    filterChanged();
  }
  roleSel.addEventListener("change", function () { state.role = roleSel.value; filterChanged(); });
  loIn.addEventListener("input", readRange);
  hiIn.addEventListener("input", readRange);
  var twrap = el("div", { "class": "tablewrap" });
  var table = el("table", { "class": "rank", id: "rank-table" });
  var thead = el("thead"), tbody = el("tbody");
  table.appendChild(thead);
  table.appendChild(tbody);
  twrap.appendChild(table);
  tableP.appendChild(twrap);
  var COLS = [{ key: "#head", label: "head", l: true }].concat(IMAGE ? [] : [{ key: "#kv", label: "KV" }])
    .concat([{ key: "#roles", label: "roles", l: true }]).concat(SCORES.map(function (s) { return { key: s.name, label: s.name, title: s.description }; }));
  var rowOf = {};
  function sortValue(i, key) {
    if (key === "#head") return i;
    if (key === "#kv") return Math.floor(i / H) * KV + kvGroup(i % H);
    if (key === "#roles") return LABELS[i].join(",");
    var v = vals(key)[i];
    return finite(v) ? v : null;
  }
  function renderTable() {
    clear(thead);
    var tr = el("tr");
    COLS.forEach(function (c) {
      var th = el("th", { "class": (c.l ? "l " : "") + (c.key === state.score ? "cur" : ""), title: c.title || "sort" },
        c.label + (state.sortKey === c.key ? (state.sortDir < 0 ? " \u25bc" : " \u25b2") : ""));
      th.addEventListener("click", function () {
        if (state.sortKey === c.key) state.sortDir = -state.sortDir; else { state.sortKey = c.key; state.sortDir = c.key[0] === "#" ? 1 : -1; }
        renderTable();
      });
      tr.appendChild(th);
    });
    thead.appendChild(tr);
    var rows = [];
    for (var i = 0; i < N; i++) if (passes(i)) rows.push(i);
    var key = state.sortKey, dir = state.sortDir;
    rows.sort(function (a, b) {
      var va = sortValue(a, key), vb = sortValue(b, key);
      if (va === null && vb === null) return a - b;
      if (va === null) return 1;
      if (vb === null) return -1;
      return va < vb ? -dir : va > vb ? dir : a - b;
    });
    var shown = rows.slice(0, 2000);
    tcount.textContent = rows.length + " of " + N + " heads" + (shown.length < rows.length ? " (first 2000 shown)" : "");
    clear(tbody);
    rowOf = {};
    shown.forEach(function (i) {
      var r = el("tr", { "data-index": i });
      r.appendChild(el("td", { "class": "l" }, headName(i)));
      if (!IMAGE) r.appendChild(el("td", null, kvGroup(i % H)));
      var rc = el("td", { "class": "l" });
      LABELS[i].forEach(function (x) { var b = el("span", { "class": "badge" }, x); b.style.background = roleColour(x); rc.appendChild(b); });
      r.appendChild(rc);
      SCORES.forEach(function (s) { r.appendChild(el("td", null, fmt(s.values[i]))); });
      if (i === state.selected) r.className = "sel";
      rowOf[i] = r;
      tbody.appendChild(r);
    });
  }
  tbody.addEventListener("click", function (ev) {
    var r = ev.target.closest("tr");
    if (r) select(+r.getAttribute("data-index"), "table");
  });
  function filterChanged() { colourGrid(); colourMap(); renderTable(); }

  // ---------- 3. head detail ----------
  var detail = el("div", { "class": "detail", id: "detail" });
  detailP.appendChild(detail);
  var S = D.samples;
  var SHORT = S && S.short ? { meta: S.short, q: decode(S.short.map) } : null;
  var LONG = S && S.long ? { meta: S.long, q: decode(S.long.map), row: decode(S.long.last_row) } : null;
  var REGION_COLOURS = { sink: "#e8590c", needle: "#d6336c", recent: "#1c7ed6", other: "#ced4da" };

  function mapValue(q, meta, i, a, b) {
    var n = meta.shape[2], qq = q[(i * n + a) * n + b] / 255;
    return qq * qq * meta.max[i];
  }
  function heatmap(q, meta, i, hover) {
    var n = meta.shape[2], cv = el("canvas", { width: n, height: n, "class": "heat" });
    var ctx = cv.getContext("2d"), img = ctx.createImageData(n, n);
    for (var a = 0; a < n; a++) for (var b = 0; b < n; b++) {
      var t = q[(i * n + a) * n + b] / 255, col = ramp(HEAT, t), o = (a * n + b) * 4;
      img.data[o] = col[0]; img.data[o + 1] = col[1]; img.data[o + 2] = col[2]; img.data[o + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    cv.addEventListener("mousemove", function (ev) {
      var rect = cv.getBoundingClientRect();
      var b = Math.floor((ev.clientX - rect.left) / rect.width * n), a = Math.floor((ev.clientY - rect.top) / rect.height * n);
      if (a < 0 || b < 0 || a >= n || b >= n) return;
      showTip(ev, hover(a, b, mapValue(q, meta, i, a, b)));
    });
    cv.addEventListener("mouseleave", hideTip);
    return cv;
  }
  function tokenText(s) { return JSON.stringify(s); }
  function blockRange(n, blocks, k) { return [Math.ceil(k * n / blocks), Math.ceil((k + 1) * n / blocks) - 1]; }
  function snippet(tokens, lo, hi) {
    var s = tokens.slice(lo, Math.min(hi + 1, lo + 24)).join("");
    return s.length > 60 ? s.slice(0, 59) + "\u2026" : s;
  }
  function stackedBar(parts, width) {
    var s = sv("svg", { width: width, height: 16 }), x = 0;
    parts.forEach(function (p) {
      var w = Math.max(0, p.v) * width;
      var r = sv("rect", { x: x, y: 2, width: w, height: 12, fill: p.c });
      r.appendChild(sv("title", null, p.n + ": " + pct(p.v)));
      s.appendChild(r);
      x += w;
    });
    return s;
  }
  // Per bin, the mean of a profile over the heads of head i's layer (NaNs skipped).
  function layerMean(prof, i, k) {
    var layer = Math.floor(i / H), mean = [];
    for (var j = 0; j < k; j++) {
      var sum = 0, cnt = 0;
      for (var h = 0; h < H; h++) { var v = prof.values[layer * H + h][j]; if (finite(v)) { sum += v; cnt++; } }
      mean.push(cnt ? sum / cnt : 0);
    }
    return mean;
  }
  function distanceChart(prof, i) {
    var k = prof.values[i].length, W = 350, Hh = 120, lb = 40, bw = (W - lb - 4) / k;
    var s = sv("svg", { width: W, height: Hh + 30, id: "distance-chart" });
    var mean = layerMean(prof, i, k);
    var mx = Math.max.apply(null, prof.values[i].concat(mean).map(function (v) { return finite(v) ? v : 0; })) || 1;
    s.appendChild(sv("text", { x: lb - 3, y: 10, "text-anchor": "end" }, fmt(mx)));
    s.appendChild(sv("text", { x: lb - 3, y: Hh, "text-anchor": "end" }, "0"));
    var d = "";
    for (var j2 = 0; j2 < k; j2++) {
      var v2 = finite(prof.values[i][j2]) ? prof.values[i][j2] : 0, bh = v2 / mx * (Hh - 6);
      var r = sv("rect", { x: lb + j2 * bw + 1, y: Hh - bh, width: Math.max(1, bw - 2), height: bh, fill: "#5b7bd5" });
      var bin = prof.bins ? prof.bins[j2] : [j2, j2];
      r.appendChild(sv("title", null, "distance " + (bin[0] === bin[1] ? bin[0] : bin[0] + "\u2013" + bin[1]) + ": " +
        pct(v2) + " (layer mean " + pct(mean[j2]) + ")"));
      s.appendChild(r);
      d += (j2 ? "L" : "M") + (lb + (j2 + 0.5) * bw) + " " + (Hh - mean[j2] / mx * (Hh - 6));
      if (k <= 16 || j2 % 2 === 0) {
        s.appendChild(sv("text", { x: lb + (j2 + 0.5) * bw, y: Hh + 11, "text-anchor": "middle" },
          bin[0] === bin[1] ? String(bin[0]) : String(bin[0])));
      }
    }
    s.appendChild(sv("path", { d: d, fill: "none", stroke: "#f59f00", "stroke-width": 1.5 }));
    s.appendChild(sv("text", { x: lb, y: Hh + 25 }, "token distance (bin start, log2 bins); orange: layer mean"));
    return s;
  }
  function rank(name, i) {
    var v = vals(name), x = v[i];
    if (!finite(x)) return null;
    var above = 0, n = 0;
    for (var j = 0; j < N; j++) if (finite(v[j])) { n++; if (v[j] > x) above++; }
    return [above + 1, n];
  }

  function renderDetail() {
    clear(detail);
    var i = state.selected;
    if (i === null) { detail.appendChild(el("p", { "class": "note" }, "Click a head in the grid, the map or the table.")); return; }
    var l = Math.floor(i / H), h = i % H, k = kvGroup(h);
    detail.appendChild(el("h3", { id: "detail-title" }, "Layer " + l + ", head " + h));
    var mates = [];
    for (var m = k * GS; m < (k + 1) * GS; m++) if (m !== h) mates.push(m);
    if (IMAGE) {
      detail.appendChild(el("div", { "class": "caption" }, "attends over all " + (PREFIX + G.patch_grid[0] * G.patch_grid[1] +
        (G.suffix_tokens || 0)) + " tokens: " + PREFIX + " prefix, " + G.patch_grid[0] + " \u00d7 " + G.patch_grid[1] +
        " patches" + (G.suffix_tokens ? ", " + G.suffix_tokens + " suffix" : "")));
    } else {
      detail.appendChild(el("div", { "class": "caption" }, "KV head " + k + (mates.length ? " (shared with heads " +
        mates.join(", ") + ")" : "") + " \u00b7 " + G.layer_types[l] + " attention" +
        (G.sliding_window[l] ? ", window " + G.sliding_window[l] : "")));
    }
    // roles
    detail.appendChild(el("h4", null, "Roles"));
    var roles = LABELS[i];
    if (!roles.length) detail.appendChild(el("div", { "class": "note" }, "no role: no rule's threshold is passed"));
    roles.forEach(function (r) {
      var line = el("div");
      var b = el("span", { "class": "badge" }, r);
      b.style.background = roleColour(r);
      line.appendChild(b);
      D.roles.rules.filter(function (x) { return x.role === r; }).forEach(function (rule) {
        var v = vals(rule.score);
        line.appendChild(document.createTextNode(rule.score + " = " + fmt(v ? v[i] : null) + " " + rule.op + " " +
          rule.threshold + "  (" + rule.source + ")"));
      });
      detail.appendChild(line);
    });
    // scores
    detail.appendChild(el("h4", null, "Scores"));
    var tab = el("table", { "class": "scoretab" });
    SCORES.forEach(function (s) {
      var tr = el("tr", { title: s.description });
      tr.appendChild(el("td", null, s.name));
      tr.appendChild(el("td", { style: "text-align:right" }, fmt(s.values[i])));
      var rk = rank(s.name, i), ex = extent(s.values);
      tr.appendChild(el("td", { "class": "caption" }, rk ? "#" + rk[0] + " of " + rk[1] : ""));
      var bc = el("td"), bar = el("span", { "class": "bar" });
      bar.style.width = (finite(s.values[i]) ? Math.max(1, 80 * (s.values[i] - Math.min(0, ex[0])) / ((ex[1] - Math.min(0, ex[0])) || 1)) : 0) + "px";
      bc.appendChild(bar);
      tr.appendChild(bc);
      tab.appendChild(tr);
    });
    detail.appendChild(tab);
    if (IMAGE) { imageDetail(i); validationDetail(i); return; }
    // attention patterns
    detail.appendChild(el("h4", null, "Attention patterns"));
    if (!SHORT && !LONG) {
      detail.appendChild(el("div", { "class": "note" }, "This atlas directory holds no attention samples; run " +
        "`headwise report DIR --model MODEL` to collect them."));
    }
    var maps = el("div", { "class": "maps" });
    if (SHORT) {
      var sm = SHORT.meta, toks = sm.tokens, n = sm.map.shape[2], exact = n === sm.length;
      var box = el("div");
      box.appendChild(el("div", { "class": "caption" }, "Repeated random tokens (" + sm.length + " tokens: " +
        (sm.prefix_len ? "BOS + " : "") + "a block of " + sm.block_len + ", twice)" + (exact ? "" : ", pooled to " + n + "\u00d7" + n)));
      box.appendChild(heatmap(SHORT.q, sm.map, i, function (a, b, v) {
        if (exact) return ["query " + a + " " + tokenText(toks[a]), "key " + b + " " + tokenText(toks[b]), "attention " + fmt(v)];
        var ra = blockRange(sm.length, n, a), rb = blockRange(sm.length, n, b);
        return ["queries " + ra[0] + "\u2013" + ra[1], "keys " + rb[0] + "\u2013" + rb[1], "mean mass " + fmt(v)];
      }));
      box.appendChild(el("div", { "class": "caption" }, "rows: queries, columns: keys"));
      maps.appendChild(box);
    }
    if (LONG) {
      var lm = LONG.meta, nl = lm.map.shape[2], ltoks = lm.tokens;
      var box2 = el("div");
      box2.appendChild(el("div", { "class": "caption" }, (lm.needle ? "Needle in a haystack" : "Natural text") + " (" +
        lm.length + " tokens, pooled to " + nl + "\u00d7" + nl + " blocks" + (lm.needle ? "; needle at tokens " +
        lm.needle_span[0] + "\u2013" + (lm.needle_span[1] - 1) : "") + ")"));
      box2.appendChild(heatmap(LONG.q, lm.map, i, function (a, b, v) {
        var ra = blockRange(lm.length, nl, a), rb = blockRange(lm.length, nl, b);
        return ["queries " + ra[0] + "\u2013" + ra[1], "keys " + rb[0] + "\u2013" + rb[1] + ": " + tokenText(snippet(ltoks, rb[0], rb[1])),
          "mass on these keys " + fmt(v)];
      }));
      box2.appendChild(el("div", { "class": "caption" }, "entry = attention mass the block's queries put on the key block"));
      maps.appendChild(box2);
    }
    detail.appendChild(maps);
    if (LONG) {
      var lm2 = LONG.meta;
      if (lm2.needle) {
        detail.appendChild(el("div", { "class": "caption" }, "Needle: " + tokenText(lm2.needle) + " \u00b7 question: " +
          tokenText(lm2.question)));
      }
      var regs = el("table", { "class": "scoretab", id: "regions" });
      [[lm2.needle ? "queries after the needle" : "all queries", lm2.regions_mean[i]], ["last query", lm2.regions_last[i]]].forEach(function (row) {
        var tr = el("tr");
        tr.appendChild(el("td", null, row[0]));
        var td = el("td");
        td.appendChild(stackedBar(lm2.regions.map(function (r, j) { return { n: r, v: row[1][j] || 0, c: REGION_COLOURS[r] || "#888" }; }), 220));
        tr.appendChild(td);
        tr.appendChild(el("td", { "class": "caption" }, lm2.regions.map(function (r, j) { return r + " " + pct(row[1][j] || 0); }).join(" \u00b7 ")));
        regs.appendChild(tr);
      });
      detail.appendChild(regs);
      detail.appendChild(el("div", { "class": "caption" }, "sink: first " + lm2.sink_tokens + " tokens; recent: the last " +
        lm2.window + " tokens up to the query itself; other: the rest."));
      // the last query's attention over the prompt
      var nb = lm2.last_row.shape[2], rw = 340, rs = sv("svg", { width: rw, height: 46, id: "last-row" });
      var mxq = 0;
      for (var j = 0; j < nb; j++) mxq = Math.max(mxq, LONG.row[i * nb + j]);
      for (var j3 = 0; j3 < nb; j3++) {
        var qv = LONG.row[i * nb + j3] / 255, bh = (mxq ? LONG.row[i * nb + j3] / mxq : 0) * 30;
        var rr = blockRange(lm2.length, nb, j3);
        var rect = sv("rect", { x: j3 * rw / nb, y: 32 - bh, width: Math.max(1, rw / nb - 0.5), height: bh,
          fill: rr[1] >= lm2.needle_span[0] && rr[0] < lm2.needle_span[1] ? REGION_COLOURS.needle : "#5b7bd5" });
        rect.appendChild(sv("title", null, "tokens " + rr[0] + "\u2013" + rr[1] + ": " + fmt(qv * qv * lm2.last_row.max[i]) +
          " " + tokenText(snippet(ltoks, rr[0], rr[1]))));
        rs.appendChild(rect);
      }
      rs.appendChild(sv("text", { x: 0, y: 44 }, "the last query's attention over the prompt (needle in red)"));
      detail.appendChild(rs);
    }
    // distance profile
    Object.keys(D.profiles).forEach(function (name) {
      var prof = D.profiles[name];
      detail.appendChild(el("h4", null, name + " profile"));
      if (name === "distance") detail.appendChild(distanceChart(prof, i));
      else detail.appendChild(el("div", null, (prof.values[i] || []).map(fmt).join("  ")));
      if (prof.description) detail.appendChild(el("div", { "class": "caption" }, prof.description));
    });
    validationDetail(i);
  }

  function validationDetail(i) {
    var l = Math.floor(i / H), h = i % H;
    var V = D.validation, vm = Object.keys(V.matrices), vr = V.records.filter(function (r) { return r.layer === l && r.head === h; });
    var vl = Object.keys(V.head_lists).filter(function (p) {
      return V.head_lists[p].some(function (x) { return x[0] === l && x[1] === h; });
    });
    if (vm.length || vr.length || vl.length || V.verdicts.length || V.summary.length) {
      detail.appendChild(el("h4", null, "Validation"));
      vm.forEach(function (p) { detail.appendChild(el("div", null, p + ": " + fmt(V.matrices[p][i]))); });
      vr.forEach(function (r) {
        detail.appendChild(el("div", null, r.path + ": " + r.fields.map(function (f) { return f[0] + " " + f[1]; }).join(", ")));
      });
      vl.forEach(function (p) {
        var entry = p.split(".")[0], verdict = V.verdicts.filter(function (v) { return v[0] === entry; })[0];
        detail.appendChild(el("div", null, "in " + p + (verdict ? " → " + verdict[1] : "")));
      });
      if (!vm.length && !vr.length && !vl.length) detail.appendChild(el("div", { "class": "note" }, "no validation names this head"));
      V.verdicts.forEach(function (v) {
        var d = el("div", { "class": "caption" }, v[0] + ": " + v[1]);
        d.style.color = v[2] === true ? "#2b8a3e" : v[2] === false ? "#c92a2a" : "";
        detail.appendChild(d);
      });
      if (V.summary.length) {
        var det = el("details"), sum = el("summary", null, "all validation values (" + V.summary.length + ")");
        det.appendChild(sum);
        V.summary.forEach(function (x) { det.appendChild(el("div", { "class": "caption" }, x[0] + ": " + x[1])); });
        detail.appendChild(det);
      }
    }
  }

  // ---------- 3b. head detail of an image model ----------
  var RP = D.relative_position ? decode(D.relative_position.map) : null;
  function imageDetail(i) {
    var R = G.patch_grid[0], C = G.patch_grid[1];
    var spatial = ["attention_distance", "local_attention", "prefix_attention"].filter(function (n) { return BY_NAME[n]; });
    if (spatial.length || RP || D.profiles.spatial_distance) detail.appendChild(el("h4", null, "Where it looks"));
    if (spatial.length) {
      detail.appendChild(el("div", { id: "spatial-values" }, spatial.map(function (n) {
        var v = vals(n)[i];
        if (n === "attention_distance") return "attention distance " + fmt(v) + " patches";
        return (n === "local_attention" ? "on its 3\u00d73 neighbourhood " : "on prefix tokens ") + (finite(v) ? pct(v) : fmt(v));
      }).join(" \u00b7 ")));
    }
    var maps = el("div", { "class": "maps" });
    if (RP) {
      var R2 = 2 * R - 1, C2 = 2 * C - 1, rq = D.relative_position.map;
      var box = el("div");
      box.appendChild(el("div", { "class": "caption" }, "Relative position (" + R2 + " \u00d7 " + C2 + " offsets)"));
      var wrap = el("div", { "class": "relpos" });
      var cv = gridCanvas(RP, i * R2 * C2, R2, C2, HEAT, "heat");
      cv.id = "rel-pos";
      wrap.appendChild(cv);
      var centre = el("div", { "class": "centre" });
      centre.style.left = (100 * (C - 1) / C2) + "%"; centre.style.top = (100 * (R - 1) / R2) + "%";
      centre.style.width = (100 / C2) + "%"; centre.style.height = (100 / R2) + "%";
      wrap.appendChild(centre);
      cv.addEventListener("mousemove", function (ev) {
        var rect = cv.getBoundingClientRect();
        var b = Math.floor((ev.clientX - rect.left) / rect.width * C2), a = Math.floor((ev.clientY - rect.top) / rect.height * R2);
        if (a < 0 || b < 0 || a >= R2 || b >= C2) return;
        var q = RP[i * R2 * C2 + a * C2 + b] / 255;
        showTip(ev, ["offset dy " + (a - R + 1) + ", dx " + (b - C + 1), "mean attention " + fmt(q * q * rq.max[i])]);
      });
      cv.addEventListener("mouseleave", hideTip);
      box.appendChild(wrap);
      box.appendChild(el("div", { "class": "caption" }, "centre (outlined): the query's own patch; right and down: keys " +
        "to its right and below"));
      maps.appendChild(box);
    }
    var sd = D.profiles.spatial_distance;
    if (sd) {
      var box2 = el("div");
      box2.appendChild(el("div", { "class": "caption" }, "Strength vs distance"));
      box2.appendChild(spatialChart(sd, i));
      maps.appendChild(box2);
    }
    detail.appendChild(maps);
    if (RP && D.relative_position.description) detail.appendChild(el("div", { "class": "caption" }, "Relative position: " +
      D.relative_position.description + "."));
    if (sd && sd.description) detail.appendChild(el("div", { "class": "caption" }, "Strength vs distance: " + sd.description + "."));
    var grouped = LAYOUTS.filter(function (x) { return x.group; });
    if (grouped.length) {
      detail.appendChild(el("h4", null, "Pattern groups"));
      detail.appendChild(el("div", { id: "detail-groups" }, grouped.map(function (x) {
        return x.label + ": group " + (x.group[i] === null ? "\u2013" : x.group[i]);
      }).join(" \u00b7 ")));
    }
    Object.keys(D.profiles).forEach(function (name) {
      if (name === "spatial_distance") return;
      var prof = D.profiles[name];
      detail.appendChild(el("h4", null, name + " profile"));
      detail.appendChild(el("div", null, (prof.values[i] || []).map(fmt).join("  ")));
      if (prof.description) detail.appendChild(el("div", { "class": "caption" }, prof.description));
    });
    if (!IMG) {
      detail.appendChild(el("div", { "class": "note" }, "This atlas directory holds no attention samples; run " +
        "`headwise report DIR --model MODEL` to collect them."));
    }
  }
  // The head's attention per (query patch, key patch) pair by distance ring, against its layer's mean.
  function spatialChart(prof, i) {
    var k = prof.values[i].length, W = 330, Hh = 110, lb = 44, step = (W - lb - 6) / Math.max(1, k - 1);
    var s = sv("svg", { width: W, height: Hh + 30, id: "spatial-chart" });
    var mean = layerMean(prof, i, k);
    var mx = Math.max.apply(null, prof.values[i].concat(mean).map(function (v) { return finite(v) ? v : 0; })) || 1;
    function x(j) { return lb + j * step; }
    function y(v) { return Hh - (finite(v) ? v : 0) / mx * (Hh - 8); }
    s.appendChild(sv("text", { x: lb - 3, y: 10, "text-anchor": "end" }, fmt(mx)));
    s.appendChild(sv("text", { x: lb - 3, y: Hh, "text-anchor": "end" }, "0"));
    s.appendChild(sv("line", { x1: lb, x2: W - 4, y1: Hh, y2: Hh, stroke: "#dee2e6" }));
    var dm = "", dh = "";
    for (var j2 = 0; j2 < k; j2++) {
      dm += (j2 ? "L" : "M") + x(j2) + " " + y(mean[j2]);
      dh += (j2 ? "L" : "M") + x(j2) + " " + y(prof.values[i][j2]);
    }
    s.appendChild(sv("path", { d: dm, fill: "none", stroke: "#f59f00", "stroke-width": 1.5, "stroke-dasharray": "4 2" }));
    s.appendChild(sv("path", { d: dh, fill: "none", stroke: "#364fc7", "stroke-width": 1.8 }));
    for (var j3 = 0; j3 < k; j3++) {
      var bin = prof.bins ? prof.bins[j3] : [j3, j3 + 1];
      var c = sv("circle", { cx: x(j3), cy: y(prof.values[i][j3]), r: 3, fill: "#364fc7" });
      c.appendChild(sv("title", null, "distance " + bin[0] + "\u2013" + bin[1] + " patches: " + fmt(prof.values[i][j3]) +
        " (layer mean " + fmt(mean[j3]) + ")"));
      s.appendChild(c);
      if (k <= 12 || j3 % Math.ceil(k / 12) === 0) {
        s.appendChild(sv("text", { x: x(j3), y: Hh + 11, "text-anchor": "middle" }, String(Math.round((bin[0] + bin[1]) / 2))));
      }
    }
    s.appendChild(sv("text", { x: lb, y: Hh + 25 }, "patches (ring centre); blue: head, orange: layer mean"));
    return s;
  }

  // ---------- 7. attention over images ----------
  var IMG = IMAGE && D.samples && D.samples.images ? D.samples.images : null;
  var imageView = IMG ? buildImageView() : null;
  if (imagesP && !IMG) {
    imagesP.appendChild(el("div", { "class": "note" }, "This atlas directory holds no attention samples; run " +
      "`headwise report DIR --model MODEL` to collect them."));
  }
  function buildImageView() {
    var R = G.patch_grid[0], C = G.patch_grid[1], T = IMG.tokens, Q = IMG.queries.length, NI = IMG.count;
    var ATT = decode(IMG.attention), AMAX = IMG.attention.max, TH = decode(IMG.thumbnails), S = IMG.thumbnail_side;
    var HOT = [[70, 0, 0], [190, 30, 0], [250, 120, 0], [255, 205, 0], [255, 255, 190]];
    var thumbs = [];
    for (var m = 0; m < NI; m++) {
      var tc = el("canvas", { width: S, height: S }), tctx = tc.getContext("2d"), data = tctx.createImageData(S, S);
      for (var px = 0; px < S * S; px++) {
        var o = (m * S * S + px) * 3;
        data.data[4 * px] = TH[o]; data.data[4 * px + 1] = TH[o + 1]; data.data[4 * px + 2] = TH[o + 2]; data.data[4 * px + 3] = 255;
      }
      tctx.putImageData(data, 0, 0);
      thumbs.push(tc);
    }
    var heatCv = el("canvas", { width: C, height: R }), heatCtx = heatCv.getContext("2d"), heatImg = heatCtx.createImageData(C, R);
    function patchOf(j) { var t = IMG.queries[j] - PREFIX; return t >= 0 && t < R * C ? [Math.floor(t / C), t % C] : null; }
    function queryName(j) {
      var pc = patchOf(j);
      return pc ? "patch (" + pc[0] + ", " + pc[1] + ")" : IMG.prefix_names[IMG.queries[j]] || "token " + IMG.queries[j];
    }
    function value(i, m, j, key) { var r = (i * NI + m) * Q + j, q = ATT[r * T + key] / 255; return q * q * AMAX[r]; }
    function nearestQuery(r, c) {
      var best = null, bd = Infinity;
      for (var j = 0; j < Q; j++) {
        var pc = patchOf(j);
        if (!pc) continue;
        var d = (pc[0] - r) * (pc[0] - r) + (pc[1] - c) * (pc[1] - c);
        if (d < bd) { bd = d; best = j; }
      }
      return best;
    }
    state.query = PREFIX > 0 ? 0 : nearestQuery((R - 1) / 2, (C - 1) / 2);

    var top = el("div", { "class": "imgtop" });
    var left = el("div");
    var picker = el("div", { "class": "thumbs", id: "image-picker" });
    var pick = [];
    thumbs.forEach(function (t, m) {
      var c = el("canvas", { width: S, height: S, "class": "thumb", "data-image": m });
      c.getContext("2d").drawImage(t, 0, 0);
      c.title = "image " + m;
      c.addEventListener("click", function () { state.image = m; redraw(); });
      pick.push(c);
      picker.appendChild(c);
    });
    left.appendChild(picker);
    var info = el("div", { "class": "caption", id: "image-info" });
    left.appendChild(info);
    var qc = el("canvas", { width: 256, height: 256, id: "query-canvas", "class": "qcanvas" });
    left.appendChild(qc);
    var qbtns = el("div", { "class": "controls" }), buttons = [];
    if (PREFIX) qbtns.appendChild(el("span", { "class": "caption" }, "query:"));
    for (var j0 = 0; j0 < Q; j0++) {
      if (patchOf(j0)) continue;
      (function (j) {
        var b = el("button", { type: "button", "class": "qbtn", "data-query": IMG.queries[j] }, queryName(j));
        b.addEventListener("click", function () { state.query = j; redraw(); });
        buttons.push([j, b]);
        qbtns.appendChild(b);
      })(j0);
    }
    left.appendChild(qbtns);
    left.appendChild(el("div", { "class": "caption" }, "Click the image to pick a query patch" + (Q - PREFIX < R * C ?
      " (the nearest of the " + (Q - PREFIX) + " sampled ones, dotted: " + IMG.note + ")" : "") +
      (PREFIX ? ", or a prefix token above." : ".")));
    top.appendChild(left);
    var right = el("div");
    var large = el("canvas", { width: 256, height: 256, id: "image-large", "class": "overlay-large" });
    right.appendChild(large);
    var largeCap = el("div", { "class": "caption", id: "image-large-caption" });
    right.appendChild(largeCap);
    top.appendChild(right);
    imagesP.appendChild(top);

    var size = Math.max(22, Math.min(64, Math.floor(640 / H)));
    var grid = el("div", { "class": "overlays", id: "overlays" }), ov = [];
    var head = el("div", { "class": "orow" });
    head.appendChild(el("span", { "class": "olab" }, ""));
    for (var h0 = 0; h0 < H; h0++) {
      var hl = el("span", { "class": "ohead" }, h0 % Math.ceil(24 / size) === 0 ? "H" + h0 : "");
      hl.style.width = size + "px";
      head.appendChild(hl);
    }
    grid.appendChild(head);
    for (var l = 0; l < L; l++) {
      var row = el("div", { "class": "orow" });
      row.appendChild(el("span", { "class": "olab" }, "L" + l));
      for (var h = 0; h < H; h++) {
        var c = el("canvas", { width: S, height: S, "class": "overlay", "data-index": l * H + h });
        c.style.width = c.style.height = size + "px";
        ov.push(c);
        row.appendChild(c);
      }
      grid.appendChild(row);
    }
    grid.addEventListener("click", function (ev) {
      var i = ev.target.getAttribute && ev.target.getAttribute("data-index");
      if (i !== null && i !== undefined) select(+i, "images");
    });
    grid.addEventListener("mousemove", function (ev) {
      var i = ev.target.getAttribute && ev.target.getAttribute("data-index");
      if (i === null || i === undefined) { hideTip(); return; }
      i = +i;
      var pk = +ev.target.getAttribute("data-peak");
      showTip(ev, [headName(i) + " from " + queryName(state.query), "on prefix tokens: " +
        pct(+ev.target.getAttribute("data-prefix-mass")), "brightest patch (" + Math.floor(pk / C) + ", " + pk % C + ")"]);
    });
    grid.addEventListener("mouseleave", hideTip);
    imagesP.appendChild(grid);
    imagesP.appendChild(el("div", { "class": "caption" }, "Every head's attention from the query over the image's " +
      "patches (rows: layers, columns: heads), each scaled to its own brightest patch; the mass on prefix tokens is in " +
      "the tooltip. Click a head to select it."));

    // One head's overlay: the dimmed image, its attention over the patches on top (cyan: the query patch).
    function drawOverlay(cv, i) {
      var m = state.image, j = state.query, W = cv.width, ctx = cv.getContext("2d");
      ctx.imageSmoothingEnabled = false;
      ctx.globalAlpha = 1; ctx.fillStyle = "#000"; ctx.fillRect(0, 0, W, W);
      ctx.globalAlpha = 0.45; ctx.drawImage(thumbs[m], 0, 0, W, W); ctx.globalAlpha = 1;
      var mx = 0, peak = 0, pre = 0, v = [];
      for (var p = 0; p < R * C; p++) { v.push(value(i, m, j, PREFIX + p)); if (v[p] > mx) { mx = v[p]; peak = p; } }
      for (var t = 0; t < PREFIX; t++) pre += value(i, m, j, t);
      for (var p2 = 0; p2 < R * C; p2++) {
        var f = mx > 0 ? v[p2] / mx : 0, col = ramp(HOT, f);
        heatImg.data[4 * p2] = col[0]; heatImg.data[4 * p2 + 1] = col[1]; heatImg.data[4 * p2 + 2] = col[2];
        heatImg.data[4 * p2 + 3] = Math.round(255 * (0.05 + 0.8 * f));  // the image shows through
      }
      heatCtx.putImageData(heatImg, 0, 0);
      ctx.drawImage(heatCv, 0, 0, W, W);
      var pc = patchOf(j);
      if (pc) {
        ctx.strokeStyle = "#22d3ee"; ctx.lineWidth = Math.max(1, W / 96);
        ctx.strokeRect(pc[1] * W / C + ctx.lineWidth / 2, pc[0] * W / R + ctx.lineWidth / 2, W / C - ctx.lineWidth, W / R - ctx.lineWidth);
      }
      cv.setAttribute("data-peak", peak);
      cv.setAttribute("data-prefix-mass", pre.toFixed(5));
      cv.setAttribute("data-query", IMG.queries[j]);
      cv.setAttribute("data-image", m);
      return { peak: peak, prefix: pre };
    }
    function drawQuery() {
      var W = qc.width, ctx = qc.getContext("2d");
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(thumbs[state.image], 0, 0, W, W);
      ctx.strokeStyle = "rgba(255,255,255,0.35)"; ctx.lineWidth = 1;
      for (var r = 1; r < R; r++) { ctx.beginPath(); ctx.moveTo(0, r * W / R); ctx.lineTo(W, r * W / R); ctx.stroke(); }
      for (var c = 1; c < C; c++) { ctx.beginPath(); ctx.moveTo(c * W / C, 0); ctx.lineTo(c * W / C, W); ctx.stroke(); }
      var sampled = Q - PREFIX < R * C;
      for (var j = 0; j < Q; j++) {
        var pc = patchOf(j);
        if (!pc) continue;
        if (sampled) {
          ctx.fillStyle = "rgba(34,211,238,0.9)";
          ctx.beginPath(); ctx.arc((pc[1] + 0.5) * W / C, (pc[0] + 0.5) * W / R, 2.2, 0, 2 * Math.PI); ctx.fill();
        }
        if (j === state.query) {
          ctx.strokeStyle = "#22d3ee"; ctx.lineWidth = 3;
          ctx.strokeRect(pc[1] * W / C + 1.5, pc[0] * W / R + 1.5, W / C - 3, W / R - 3);
        }
      }
      qc.setAttribute("data-query", IMG.queries[state.query]);
      qc.setAttribute("data-image", state.image);
      buttons.forEach(function (x) { x[1].classList.toggle("cur", x[0] === state.query); });
    }
    qc.addEventListener("click", function (ev) {
      var rect = qc.getBoundingClientRect();
      var c = Math.floor((ev.clientX - rect.left) / rect.width * C), r = Math.floor((ev.clientY - rect.top) / rect.height * R);
      var j = nearestQuery(Math.max(0, Math.min(R - 1, r)), Math.max(0, Math.min(C - 1, c)));
      if (j !== null) { state.query = j; redraw(); }
    });
    qc.addEventListener("mousemove", function (ev) {
      var rect = qc.getBoundingClientRect();
      var c = Math.floor((ev.clientX - rect.left) / rect.width * C), r = Math.floor((ev.clientY - rect.top) / rect.height * R);
      if (r < 0 || c < 0 || r >= R || c >= C) return;
      var j = nearestQuery(r, c), pc = j === null ? null : patchOf(j);
      showTip(ev, ["patch (" + r + ", " + c + ")" + (pc && (pc[0] !== r || pc[1] !== c) ? ": the nearest sampled query is " +
        queryName(j) : ""), "click to query from it"]);
    });
    qc.addEventListener("mouseleave", hideTip);
    function className(k) { return k === null || k === undefined ? "\u2013" : k + (IMG.class_names[k] ? " (" + IMG.class_names[k] + ")" : ""); }
    function drawInfo() {
      var m = state.image, lab = IMG.labels ? IMG.labels[m] : null, pred = IMG.predictions ? IMG.predictions[m] : null;
      var parts = ["image " + (m + 1) + " of " + NI];
      if (IMG.labels) parts.push("label " + className(lab));
      if (IMG.predictions) parts.push("predicted " + className(pred) + (IMG.labels ? (lab === pred ? " \u2713" : " \u2717") : ""));
      parts.push(IMG.sources[m]);
      info.textContent = parts.join(" \u00b7 ");
      pick.forEach(function (c, k) { c.classList.toggle("cur", k === m); });
    }
    function drawLarge() {
      var i = state.selected;
      if (i === null) return;
      var r = drawOverlay(large, i);
      large.setAttribute("data-index", i);
      largeCap.textContent = headName(i) + " from " + queryName(state.query) + ": " + pct(r.prefix) + " of its attention on " +
        "prefix tokens; brightest patch (" + Math.floor(r.peak / C) + ", " + r.peak % C + ")";
    }
    function redraw() {
      drawInfo(); drawQuery();
      for (var i = 0; i < N; i++) drawOverlay(ov[i], i);
      drawLarge();
    }
    function onSelect(i, prev) {
      if (prev !== null && prev !== undefined) ov[prev].classList.remove("sel");
      ov[i].classList.add("sel");
      drawLarge();
    }
    return { redraw: redraw, select: onSelect };
  }

  // ---------- 8. importance ----------
  var impRows = {};
  if (impP) buildImportance();
  function buildImportance() {
    var I = D.importance, v = vals(I.score), marked = {};
    if (!I.validations.length) {
      impP.appendChild(el("div", { "class": "note" }, "No validation of the \u201cimportant\u201d role yet: headwise validate " +
        "--role important --atlas DIR zeroes the top heads together against random sets of heads."));
    }
    I.validations.forEach(function (c) {
      c.targeted_heads.forEach(function (x) { (marked[x[0] * H + x[1]] = marked[x[0] * H + x[1]] || []).push(c.key); });
      var box = el("div", { "class": "valid", "data-key": c.key });
      box.appendChild(el("div", { "class": "t" }, c.key + ": the top " + c.k + " heads zeroed together (" + (c.task || "task") + ")"));
      var rs = c.random.slice().sort(function (a, b) { return a - b; });
      var mean = rs.length ? rs.reduce(function (a, b) { return a + b; }, 0) / rs.length : null;
      box.appendChild(el("div", null, (c.metric || "metric") + ": unablated " + fmt(c.baseline) + " \u2192 top " + c.k +
        " zeroed " + fmt(c.targeted) + "; " + rs.length + " random sets of " + c.k + ": mean " + fmt(mean) +
        (rs.length ? " (" + fmt(rs[0]) + "\u2013" + fmt(rs[rs.length - 1]) + ")" : "")));
      var all = [c.baseline, c.targeted].concat(rs).filter(finite), ex = extent(all), W = 320, x0 = 10;
      function x(val) { return x0 + (val - ex[0]) / ((ex[1] - ex[0]) || 1) * (W - 2 * x0); }
      var plot = sv("svg", { width: W, height: 30, "class": "dots" });
      plot.appendChild(sv("line", { x1: x0, x2: W - x0, y1: 15, y2: 15, stroke: "#dee2e6" }));
      if (finite(c.baseline)) {
        var bl = sv("line", { x1: x(c.baseline), x2: x(c.baseline), y1: 4, y2: 26, stroke: "#495057", "stroke-dasharray": "3 2" });
        bl.appendChild(sv("title", null, "unablated " + fmt(c.baseline)));
        plot.appendChild(bl);
      }
      rs.forEach(function (r) {
        var d = sv("circle", { cx: x(r), cy: 15, r: 4, fill: "#adb5bd" });
        d.appendChild(sv("title", null, "random set: " + fmt(r)));
        plot.appendChild(d);
      });
      if (finite(c.targeted)) {
        var td = sv("circle", { cx: x(c.targeted), cy: 15, r: 5, fill: "#e03131" });
        td.appendChild(sv("title", null, "top " + c.k + " zeroed: " + fmt(c.targeted)));
        plot.appendChild(td);
      }
      box.appendChild(plot);
      var verdict = el("div", { "class": "verdict" }, c.verdict || "(no verdict)");
      verdict.style.color = c.passes === true ? "#2b8a3e" : c.passes === false ? "#c92a2a" : "";
      box.appendChild(verdict);
      impP.appendChild(box);
    });
    if (I.validations.length) {
      impP.appendChild(el("div", { "class": "caption" }, "dashed: unablated; red: the top heads zeroed; grey: random sets " +
        "of as many heads. \u25c6 in the table: zeroed in a validation."));
    }
    var order = [];
    for (var i = 0; i < N; i++) order.push(i);
    order.sort(function (a, b) {
      var fa = finite(v[a]), fb = finite(v[b]);
      if (fa !== fb) return fa ? -1 : 1;
      return fa && v[a] !== v[b] ? v[b] - v[a] : a - b;
    });
    var wrap = el("div", { "class": "tablewrap" }), table = el("table", { "class": "rank", id: "importance-table" });
    var tr = el("tr");
    ["#", "head"].concat(I.columns).concat(["roles"]).forEach(function (c, k) {
      tr.appendChild(el("th", { "class": k < 2 || c === "roles" ? "l" : "", title: BY_NAME[c] ? BY_NAME[c].description : "" }, c));
    });
    var thead = el("thead"), tbody = el("tbody");
    thead.appendChild(tr);
    table.appendChild(thead);
    var ex = extent(v);
    order.forEach(function (i, rank) {
      var r = el("tr", { "data-index": i });
      r.appendChild(el("td", { "class": "l" }, rank + 1));
      r.appendChild(el("td", { "class": "l", title: marked[i] ? "zeroed in " + marked[i].join(", ") : "" },
        headName(i) + (marked[i] ? " \u25c6" : "")));
      I.columns.forEach(function (c) {
        var td = el("td", null, fmt(vals(c)[i]));
        if (c === I.score && finite(v[i])) {
          var bar = el("span", { "class": "bar" });
          bar.style.width = Math.max(1, 50 * (v[i] - Math.min(0, ex[0])) / ((ex[1] - Math.min(0, ex[0])) || 1)) + "px";
          bar.style.marginLeft = "6px";
          td.appendChild(bar);
        }
        r.appendChild(td);
      });
      var rc = el("td", { "class": "l" });
      LABELS[i].forEach(function (x) { var b = el("span", { "class": "badge" }, x); b.style.background = roleColour(x); rc.appendChild(b); });
      r.appendChild(rc);
      impRows[i] = r;
      tbody.appendChild(r);
    });
    table.appendChild(tbody);
    tbody.addEventListener("click", function (ev) {
      var r = ev.target.closest("tr");
      if (r) select(+r.getAttribute("data-index"), "importance");
    });
    wrap.appendChild(table);
    impP.appendChild(wrap);
    impP.appendChild(el("div", { "class": "caption" }, "Heads ranked by " + I.score + " (" + (BY_NAME[I.score] ?
      BY_NAME[I.score].description : "") + "), with the other importance scores."));
  }

  // ---------- 5. layer trends ----------
  var trendBox = el("div", { "class": "trends", id: "trends" });
  trendsP.appendChild(trendBox);
  trendsP.appendChild(el("div", { "class": "caption" }, "Each score's distribution over a layer's heads: min\u2013max (line), " +
    "interquartile range (box), median (dark). Red: the selected head. Click a chart to colour by that score."));
  function quantile(sorted, q) {
    if (!sorted.length) return NaN;
    var pos = (sorted.length - 1) * q, lo = Math.floor(pos), hi = Math.ceil(pos);
    return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
  }
  function renderTrends() {
    clear(trendBox);
    var TW = 260, TH = 96, lb = 46, bw = (TW - lb - 4) / L;
    SCORES.forEach(function (s) {
      var box = el("div", { "class": "trend" + (s.name === state.score ? " cur" : ""), "data-score": s.name, title: s.description });
      box.appendChild(el("div", { "class": "t" }, s.name));
      var svg = sv("svg", { width: TW, height: TH + 12 }), ex = extent(s.values);
      function y(v) { return 4 + (1 - (v - ex[0]) / ((ex[1] - ex[0]) || 1)) * (TH - 8); }
      svg.appendChild(sv("text", { x: lb - 3, y: 10, "text-anchor": "end" }, fmt(ex[1])));
      svg.appendChild(sv("text", { x: lb - 3, y: TH - 2, "text-anchor": "end" }, fmt(ex[0])));
      var med = "";
      for (var l = 0; l < L; l++) {
        var v = s.values.slice(l * H, (l + 1) * H).filter(finite).sort(function (a, b) { return a - b; });
        if (!v.length) continue;
        var cx = lb + (l + 0.5) * bw;
        svg.appendChild(sv("line", { x1: cx, x2: cx, y1: y(v[0]), y2: y(v[v.length - 1]), stroke: "#adb5bd" }));
        var q1 = quantile(v, 0.25), q3 = quantile(v, 0.75), md = quantile(v, 0.5);
        svg.appendChild(sv("rect", { x: cx - Math.max(1, bw * 0.35), y: y(q3), width: Math.max(2, bw * 0.7),
          height: Math.max(1, y(q1) - y(q3)), fill: "#a5b4e8" }));
        med += (med ? "L" : "M") + cx + " " + y(md);
      }
      svg.appendChild(sv("path", { d: med, fill: "none", stroke: "#364fc7", "stroke-width": 1.5 }));
      if (state.selected !== null && finite(s.values[state.selected])) {
        svg.appendChild(sv("circle", { cx: lb + (Math.floor(state.selected / H) + 0.5) * bw, cy: y(s.values[state.selected]),
          r: 3.5, fill: "#e03131" }));
      }
      svg.appendChild(sv("text", { x: lb, y: TH + 10 }, "layer 0"));
      svg.appendChild(sv("text", { x: TW - 4, y: TH + 10, "text-anchor": "end" }, "layer " + (L - 1)));
      box.appendChild(svg);
      box.addEventListener("click", function () { setScore(s.name); });
      trendBox.appendChild(box);
    });
  }

  // ---------- 6. KV-cache preview ----------
  // A language model's only: an image model has no KV cache to preview.
  function kvPreview() {
    // The same numbers as headwise.kv.Policy.from_atlas(atlas, score, full_fraction=f, higher_is_full=..., sink=S,
    // window=W, middle=M).kv_bytes(context, dtype_bytes=b) and Policy.full_cache(geometry).kv_bytes(...)
    // (tests/report/test_browser.py checks them against each other).
    var set = D.settings || {};
    var kvScore = pickDefault(["retrieval", "streamable_mass"].concat(SCORES.map(function (s) { return s.name; })));
    // Layers the model itself windows (Gemma3's sliding layers) keep the model's own cache: never selectable.
    var WINDOWED = G.layer_types.map(function (t) { return t === "sliding"; });
    var N_SEL = WINDOWED.filter(function (w) { return !w; }).length * KV;
    var kvc = el("div", { "class": "controls" });
    function control(labelText, input) { var lb = el("label", null, labelText + " "); lb.appendChild(input); kvc.appendChild(lb); return input; }
    var kvSel = control("rank KV heads by", el("select", { id: "kv-score" }));
    SCORES.forEach(function (s) { kvSel.appendChild(el("option", { value: s.name }, s.name)); });
    kvSel.value = kvScore || "";
    var kvOrder = control("keep whole", el("select", { id: "kv-order" }));
    kvOrder.appendChild(el("option", { value: "high" }, "highest first"));
    kvOrder.appendChild(el("option", { value: "low" }, "lowest first"));
    var kvOrderNote = el("span", { "class": "caption", id: "kv-order-note" });
    kvc.appendChild(kvOrderNote);
    // The atlas says, per score, which end needs the full cache ("high", "low", or nothing).
    function needsFull(name) { var s = BY_NAME[name], n = s ? s.needs_full : null; return n === "high" || n === "low" ? n : null; }
    function defaultOrder(name) {
      var n = needsFull(name);
      kvOrderNote.textContent = name && !n ? "(" + name + " does not say which end needs the full cache)" : "";
      return n || "high";
    }
    kvOrder.value = defaultOrder(kvScore);
    var kvFrac = control("fraction kept whole", el("input", { type: "range", min: 0, max: 1, step: 0.01, value: 0.25, id: "kv-fraction" }));
    var kvFracOut = el("span", { "class": "big" });
    kvc.appendChild(kvFracOut);
    var kvCtx = control("context", el("input", { type: "number", min: 1, value: Math.min(32768, G.max_positions || 32768), id: "kv-context" }));
    // S and W default to the streaming cache the atlas's streamable_mass was scored with (64 + 256).
    var kvS = control("sink S", el("input", { type: "number", min: 0, value: set.sink_tokens || 64, id: "kv-sink" }));
    var kvW = control("window W", el("input", { type: "number", min: 1, value: set.window || 256, id: "kv-window" }));
    var kvM = control("middle M", el("input", { type: "number", min: 0, value: 0, id: "kv-middle" }));
    var kvB = control("bytes/value", el("select", { id: "kv-bytes" }));
    [["2", "2 (bf16/fp16)"], ["1", "1 (fp8/int8)"], ["4", "4 (fp32)"]].forEach(function (o) { kvB.appendChild(el("option", { value: o[0] }, o[1])); });
    kvP.appendChild(kvc);
    var kvOut = el("div", { "class": "kvres", id: "kv-result" });
    kvP.appendChild(kvOut);
    var kvGridBox = el("div");
    kvP.appendChild(kvGridBox);
    kvP.appendChild(el("div", { "class": "caption" }, "Full cache: 2 (K and V) \u00d7 layers \u00d7 KV heads \u00d7 head dim \u00d7 tokens \u00d7 bytes. " +
      "Head-aware: the chosen fraction of the selectable KV heads keeps every token, ranked by their need for the full cache " +
      "(the score, or minus the score when lowest first; a KV head takes the max over its query heads; heads without a value rank last); " +
      "the rest keep S + W + M tokens (sinks, recent window, middle tokens). " +
      "The model's own sliding-window layers are not selectable: in both caches each of their KV heads keeps at most its window minus one token."));
    function count(input, lo) { var x = Math.floor(+input.value); return isFinite(x) ? Math.max(lo, x) : lo; }
    function kvUpdate() {
      var name = kvSel.value, v = vals(name), f = Math.min(1, Math.max(0, +kvFrac.value || 0)), ctx = count(kvCtx, 1);
      var stream = count(kvS, 0) + count(kvW, 1) + count(kvM, 0), bpe = +kvB.value, high = kvOrder.value !== "low";
      kvFracOut.textContent = pct(f);
      // Need per KV head (layer-major, l * KV + k): max over its query heads; missing values and sliding layers -Infinity.
      var need = [], idx = [];
      for (var l = 0; l < L; l++) for (var k = 0; k < KV; k++) {
        var a = -Infinity;
        if (!WINDOWED[l]) for (var h = k * GS; h < (k + 1) * GS; h++) {
          var x = v ? v[l * H + h] : null;
          if (finite(x) && (high ? x : -x) > a) a = high ? x : -x;
        }
        idx.push(need.length);
        need.push(a);
      }
      // Selectable heads first (a head without a value still comes before a layer the model windows), then the
      // highest need; ties keep index order (numpy's stable lexsort, as kv/heads.py ranks them).
      idx.sort(function (i, j) {
        var wi = WINDOWED[Math.floor(i / KV)] ? 1 : 0, wj = WINDOWED[Math.floor(j / KV)] ? 1 : 0;
        if (wi !== wj) return wi - wj;
        return need[i] === need[j] ? i - j : need[i] > need[j] ? -1 : 1;
      });
      var nKeep = Math.min(N_SEL, Math.max(0, Math.floor(f * N_SEL + 0.5))), kept = {};
      for (var j = 0; j < nKeep; j++) kept[idx[j]] = true;
      var per = 2 * G.head_dim * bpe, full = 0, aware = 0, nWhole = 0, kind = [];
      for (var l2 = 0; l2 < L; l2++) for (var k2 = 0; k2 < KV; k2++) {
        var i2 = l2 * KV + k2;
        if (WINDOWED[l2]) {
          var held = G.sliding_window[l2] ? Math.min(ctx, G.sliding_window[l2] - 1) : ctx;
          full += per * held;
          aware += per * held;
          kind.push("model-window");
        } else {
          full += per * ctx;
          aware += per * (kept[i2] ? ctx : Math.min(ctx, stream));
          kind.push(kept[i2] ? "full" : "streaming");
          if (kept[i2]) nWhole++;
        }
      }
      clear(kvOut);
      [["full cache", bytes(full)], ["head-aware cache", bytes(aware)], ["head-aware / full", pct(aware / full)]].forEach(function (x) {
        var d = el("div"), s = el("span", null, x[0]);
        d.appendChild(s);
        d.appendChild(el("b", { "class": "big" }, x[1]));
        kvOut.appendChild(d);
      });
      kvOut.setAttribute("data-full", full);
      kvOut.setAttribute("data-aware", aware);
      clear(kvGridBox);
      var c = Math.max(4, Math.min(14, Math.floor(300 / Math.max(L, KV)))), g = sv("svg", { width: Math.max(60, 40 + L * c), height: KV * c + 2 });
      var what = { full: "whole", streaming: "S + W + M tokens", "model-window": "the model's sliding window (not selectable)" };
      for (var l3 = 0; l3 < L; l3++) for (var k3 = 0; k3 < KV; k3++) {
        var kd = kind[l3 * KV + k3];
        var r = sv("rect", { x: 40 + l3 * c, y: k3 * c, width: c - 1, height: c - 1, "data-kind": kd,
          fill: kd === "full" ? "#364fc7" : kd === "model-window" ? "#e9ecef" : "#ced4da" });
        r.appendChild(sv("title", null, "layer " + l3 + ", KV head " + k3 + ": " + what[kd]));
        g.appendChild(r);
      }
      g.appendChild(sv("text", { x: 0, y: c * 0.9 }, "KV 0"));
      kvGridBox.appendChild(g);
      kvGridBox.appendChild(el("div", { "class": "caption" }, nWhole + " of " + N_SEL + " selectable KV heads whole (blue)" +
        (N_SEL < L * KV ? ", pale: the model's own sliding-window layers" : "") + "; columns are layers"));
    }
    kvSel.addEventListener("change", function () { kvOrder.value = defaultOrder(kvSel.value); kvUpdate(); });
    [kvOrder, kvFrac, kvCtx, kvS, kvW, kvM, kvB].forEach(function (x) { x.addEventListener("input", kvUpdate); x.addEventListener("change", kvUpdate); });
    kvUpdate();
  }

  // ---------- linking ----------
  function select(i, from) {
    var prev = state.selected;
    if (state.selected !== null) {
      cells[state.selected].classList.remove("sel");
      pts[state.selected].classList.remove("sel");
      if (rowOf[state.selected]) rowOf[state.selected].classList.remove("sel");
      if (impRows[state.selected]) impRows[state.selected].classList.remove("sel");
    }
    state.selected = i;
    cells[i].classList.add("sel");
    pts[i].classList.add("sel");
    pts[i].parentNode.appendChild(pts[i]);  // draw on top
    if (rowOf[i]) {
      rowOf[i].classList.add("sel");
      if (from !== "table") {
        var top = rowOf[i].offsetTop - twrap.clientHeight / 2;
        twrap.scrollTop = Math.max(0, top);
      }
    }
    if (impRows[i]) {
      impRows[i].classList.add("sel");
      var iw = impRows[i].closest(".tablewrap");
      if (from !== "importance" && iw) iw.scrollTop = Math.max(0, impRows[i].offsetTop - iw.clientHeight / 2);
    }
    if (imageView) imageView.select(i, prev);
    document.body.setAttribute("data-selected", headName(i));
    renderDetail();
    renderTrends();
  }
  function setScore(name) {
    state.score = name;
    scoreSel.value = name;
    rangeLabel.textContent = name + " in";
    state.lo = state.hi = null;
    loIn.value = hiIn.value = "";
    colourGrid(); colourMap(); renderTable(); renderTrends();
  }
  scoreSel.addEventListener("change", function () { setScore(scoreSel.value); });
  document.addEventListener("keydown", function (ev) {
    if (state.selected === null || /INPUT|SELECT|TEXTAREA/.test(ev.target.tagName)) return;
    var i = state.selected, l = Math.floor(i / H), h = i % H;
    if (ev.key === "ArrowUp") l = Math.max(0, l - 1); else if (ev.key === "ArrowDown") l = Math.min(L - 1, l + 1);
    else if (ev.key === "ArrowLeft") h = Math.max(0, h - 1); else if (ev.key === "ArrowRight") h = Math.min(H - 1, h + 1);
    else return;
    ev.preventDefault();
    select(l * H + h, "key");
  });

  // ---------- first render ----------
  rangeLabel.textContent = (state.score || "score") + " in";
  colourGrid();
  placePoints();
  colourMap();
  renderGroups();
  renderTable();
  renderTrends();
  if (kvP) kvPreview();
  if (imageView) imageView.redraw();
  var first = 0, best = -Infinity, v0 = vals(state.score);
  if (v0) for (var z = 0; z < N; z++) if (finite(v0[z]) && v0[z] > best) { best = v0[z]; first = z; }
  select(first, "init");
  window.headwiseReady = performance.now();
  document.body.setAttribute("data-ready", "1");
})();
