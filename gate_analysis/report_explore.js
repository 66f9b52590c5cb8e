(function () {
"use strict";
var errors = [], W = 1000, L = 150, R = 8, NAMES = {metric: "metrics", gate: "gates", ablation: "interventions"};
function $(id) { return document.getElementById(id); }
function fail(msg) { errors.push(String(msg)); var p = $("gx-errors"); if (p) { p.textContent = errors.join("\n"); p.hidden = false; } }
window.addEventListener("error", function (e) { fail(e.message || e.type); });
var consoleError = console.error;
console.error = function () { fail(Array.prototype.join.call(arguments, " ")); consoleError.apply(console, arguments); };
function esc(s) { return String(s).replace(/[&<>"']/g, function (c) { return "&#" + c.charCodeAt(0) + ";"; }); }
function fmt(v) {
  if (v === null || v === undefined || (typeof v === "number" && !isFinite(v))) return "";
  if (typeof v !== "number") return String(v);
  return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(4)));
}
function fixed(o) { if (!o) return null; var s = Math.pow(10, o.e); return o.v.map(function (x) { return x === null ? NaN : x * s; }); }
function finite(a) { return a.filter(function (v) { return isFinite(v); }); }
var D = JSON.parse($("gx-data").textContent), table = $("gx-table"), cache = {};
var st = {view: "queries", key: null, dir: 1, limit: GX_LIMIT, filter: "", hide: {}, sel: null, fit: true};
function cols() { return D.views[st.view].columns; }
function tests() {
  var C = cols();
  return st.filter.trim().split(/\s+/).filter(Boolean).map(function (tok) {
    var m = /^([^<>=!]+)(<=|>=|!=|=|<|>)(.*)$/.exec(tok), ci = -1;
    if (m) { var name = m[1].toLowerCase(); ci = C.findIndex(function (c) { return c.k.toLowerCase() === name || c.l.toLowerCase() === name; }); }
    if (ci < 0) {
      var t = tok.toLowerCase();
      return function (r) { return C.some(function (c, i) { return c.g === "id" && r[i + 1] !== null && String(r[i + 1]).toLowerCase().indexOf(t) >= 0; }); };
    }
    var op = m[2], rhs = m[3], num = Number(rhs), isNum = rhs !== "" && !isNaN(num), q = rhs.toLowerCase();
    return function (r) {
      var v = r[ci + 1];
      if (v === null || v === undefined) return op === "!=";
      if (isNum && typeof v === "number") {
        return op === "<" ? v < num : op === ">" ? v > num : op === "<=" ? v <= num : op === ">=" ? v >= num : op === "=" ? v === num : v !== num;
      }
      var s = String(v).toLowerCase();
      return op === "=" ? s.indexOf(q) >= 0 : op === "!=" ? s.indexOf(q) < 0 : false;
    };
  });
}
function ordered(rows) {
  var ci = cols().findIndex(function (c) { return c.k === st.key; });
  if (ci < 0) return rows;
  var idx = rows.map(function (r, i) { return i; });
  idx.sort(function (a, b) {
    var x = rows[a][ci + 1], y = rows[b][ci + 1], nx = x === null || x === "", ny = y === null || y === "";
    if (nx || ny) return nx === ny ? a - b : nx ? 1 : -1;
    var c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
    return c !== 0 ? c * st.dir : a - b;
  });
  return idx.map(function (i) { return rows[i]; });
}
function isSel(v, qid) { return st.sel !== null && st.sel.v === v && (qid === null || st.sel.qid === qid); }
function render() {
  var C = cols(), S = [], T = tests(), all = D.views[st.view].rows, qv = st.view === "queries";
  C.forEach(function (c, i) { if (!st.hide[c.g]) S.push(i); });
  var rows = ordered(all.filter(function (r) { return T.every(function (t) { return t(r); }); }));
  var n = Math.min(rows.length, st.limit), body = [];
  table.tHead.innerHTML = "<tr>" + S.map(function (i) {
    var c = C[i], dir = c.k === st.key ? (st.dir > 0 ? " gx-asc" : " gx-desc") : "";
    return '<th data-key="' + esc(c.k) + '" class="gx-' + c.g + dir + '" title="' + esc(c.k) + '">' + esc(c.l) + "</th>";
  }).join("") + "</tr>";
  for (var j = 0; j < n; j++) {
    var r = rows[j], qid = qv ? r[1] : null;
    body.push('<tr data-v="' + r[0] + '"' + (qv ? ' data-qid="' + r[1] + '"' : "") + (isSel(r[0], qid) ? ' class="gx-sel"' : "") + ">" +
      S.map(function (i) { return (C[i].t === "s" ? '<td class="gx-s">' : "<td>") + esc(fmt(r[i + 1])) + "</td>"; }).join("") + "</tr>");
  }
  table.tBodies[0].innerHTML = body.join("");
  $("gx-count").textContent = rows.length + " of " + all.length + " rows" + (n < rows.length ? ", first " + n + " shown" : "");
  $("gx-more").hidden = n >= rows.length;
}
function groups() {
  var present = {};
  cols().forEach(function (c) { if (NAMES[c.g]) present[c.g] = true; });
  $("gx-groups").innerHTML = Object.keys(NAMES).filter(function (g) { return present[g]; }).map(function (g) {
    return '<label><input type="checkbox" data-g="' + g + '"' + (st.hide[g] ? "" : " checked") + "> " + NAMES[g] + "</label>";
  }).join(" ");
}
function video(v) { if (!(v in cache)) cache[v] = JSON.parse($("gx-v" + v).textContent); return cache[v]; }
function metricsText(qid) {
  var C = D.views.queries.columns, r = D.views.queries.rows.find(function (x) { return x[1] === qid; }), out = [];
  if (r) C.forEach(function (c, i) { if (c.g === "metric" && r[i + 1] !== null) out.push(c.l + " " + fmt(r[i + 1])); });
  return out.length ? ' <span class="muted">(' + esc(out.join(", ")) + ")</span>" : "";
}
function pathOf(pts) {
  var d = "", pen = false;
  pts.forEach(function (p) {
    if (!isFinite(p[1])) { pen = false; return; }
    d += (pen ? "L" : "M") + p[0].toFixed(1) + " " + p[1].toFixed(1); pen = true;
  });
  return d;
}
function rect(x, y, w, h, cls, tip) {
  return '<rect x="' + x.toFixed(1) + '" y="' + y.toFixed(1) + '" width="' + Math.max(w, 0.8).toFixed(1) + '" height="' + Math.max(h, 0).toFixed(1) +
    '" class="' + cls + '">' + (tip ? "<title>" + esc(tip) + "</title>" : "") + "</rect>";
}
function text(x, y, s, cls, anchor) {
  return '<text x="' + x.toFixed(1) + '" y="' + y.toFixed(1) + '" class="' + (cls || "gx-lab") + '"' + (anchor ? ' text-anchor="' + anchor + '"' : "") + ">" + esc(s) + "</text>";
}
function line(x1, y1, x2, y2, cls) {
  return '<line x1="' + x1.toFixed(1) + '" y1="' + y1.toFixed(1) + '" x2="' + x2.toFixed(1) + '" y2="' + y2.toFixed(1) + '" class="' + cls + '"></line>';
}
function timeline(V, qs) {
  var cl = D.clip_len, T = V.n_clips || 0, dur = Math.max(V.duration || 0, T * cl) || 1, out = [], y = 20, marks = [];
  var X = function (s) { return L + (W - L - R) * Math.max(0, Math.min(s, dur)) / dur; };
  var mid = function (t) { return X((t + 0.5) * cl); };
  qs.forEach(function (q) {
    out.push(text(4, y + 9, "qid " + q.qid + " windows"));
    if (q.gt) q.gt.windows.forEach(function (w) { out.push(rect(X(w[0]), y, X(w[1]) - X(w[0]), 8, "gx-gt", "relevant window " + w[0] + "-" + w[1] + " s")); });
    else out.push(text(L + 2, y + 8, "no labels", "gx-note"));
    var pw = q.pred ? q.pred.windows : [];
    pw.forEach(function (w, i) {
      out.push(rect(X(w[0]), y + 11 + i * 3, X(w[1]) - X(w[0]), 2.4, i ? "gx-pw" : "gx-top1", "predicted #" + (i + 1) + ": " + w[0] + "-" + w[1] + " s, score " + fmt(w[2])));
    });
    y += 11 + Math.max(pw.length, 1) * 3 + 6;
    var h = 28, ps = q.pred ? fixed(q.pred.saliency) : null;
    out.push(text(4, y + 17, "qid " + q.qid + " saliency"));
    out.push(rect(L, y, W - L - R, h, "gx-lane"));
    if (q.gt) q.gt.clips.forEach(function (c, i) {
      var sc = q.gt.scores[i] || [], m = sc.length ? sc.reduce(function (a, b) { return a + b; }, 0) / sc.length : 0;
      out.push(rect(X(c * cl), y + h - h * m / 4, X((c + 1) * cl) - X(c * cl), h * m / 4, "gx-ts", "clip " + c + ": annotators " + sc.join(", ")));
    });
    if (ps && ps.length) {
      var f = finite(ps), lo = Math.min.apply(null, f), hi = Math.max.apply(null, f);
      out.push('<path class="gx-ps" d="' + pathOf(ps.map(function (v, t) { return [mid(t), y + h - h * (hi > lo ? (v - lo) / (hi - lo) : 0.5)]; })) + '"><title>predicted saliency, ' + fmt(lo) + " to " + fmt(hi) + "</title></path>");
    }
    q._ps = ps; y += h + 8;
  });
  D.gates.forEach(function (g) {
    var lane = V.lanes[g.name];
    if (!lane) return;
    var h = 40, m = lane.m ? fixed(lane.m) : null, s = lane.s ? fixed(lane.s) : null, lo = g.low, hi = g.high;
    var vals = m ? m.concat(s ? m.map(function (v, i) { return v + s[i]; }).concat(m.map(function (v, i) { return v - s[i]; })) : []) : lane.g.map(function (p) { return p[1]; });
    var f = finite(vals), kind = "gx-" + g.name.split(".gate_")[1], bounded = lo !== null && hi !== null;
    if ((st.fit || !bounded) && f.length) {  // fit to this video's values (at least 2% of the declared range)
      var a = Math.min.apply(null, f), b = Math.max.apply(null, f), span = Math.max(b - a, bounded ? 0.02 * (hi - lo) : 1e-6);
      lo = (a + b - span) / 2 - 0.08 * span; hi = (a + b + span) / 2 + 0.08 * span;
    }
    if (!(hi > lo)) { lo = -1; hi = 1; }
    var Y = function (v) { return y + h - h * (Math.max(lo, Math.min(hi, v)) - lo) / (hi - lo); };
    out.push(text(4, y + h / 2 + 4, g.name), text(L - 3, y + 8, fmt(hi), "gx-tick", "end"), text(L - 3, y + h, fmt(lo), "gx-tick", "end"));
    out.push(rect(L, y, W - L - R, h, "gx-lane"));
    if (g.ref >= lo && g.ref <= hi) out.push(line(L, Y(g.ref), W - R, Y(g.ref), "gx-ref"));
    if (m) {
      if (s) {
        var up = m.map(function (v, t) { return [mid(t), Y(v + s[t])]; }), down = m.map(function (v, t) { return [mid(t), Y(v - s[t])]; }).reverse();
        out.push('<path class="gx-band ' + kind + '" d="' + pathOf(up.concat(down)) + 'Z"></path>');
      }
      out.push('<path class="gx-g ' + kind + '" d="' + pathOf(m.map(function (v, t) { return [mid(t), Y(v)]; })) + '"></path>');
    } else {
      var same = {};  // queries with the same gate share one line
      lane.g.forEach(function (p) { (same[p[1]] = same[p[1]] || []).push(p[0]); });
      Object.keys(same).forEach(function (v, i) {
        var yy = Y(+v);
        out.push(line(L, yy, W - R, yy, "gx-g " + kind), text(W - R - 4 - 160 * i, yy - 2, "qid " + same[v].join(", ") + ": " + fmt(+v), "gx-tick", "end"));
      });
    }
    V["_m" + g.name] = m; V["_s" + g.name] = s; y += h + 6;
  });
  var step = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600].find(function (x) { return dur / x <= 12; }) || 1200;
  for (var t = 0; t <= dur + 1e-9; t += step) marks.push(line(X(t), 14, X(t), y, "gx-grid"), text(X(t), 11, t + " s", "gx-tick", "middle"));
  return '<svg id="gx-svg" viewBox="0 0 ' + W + " " + y + '" data-lanes="' + D.gates.filter(function (g) { return V.lanes[g.name]; }).length + '">' +
    marks.join("") + out.join("") + '<line id="gx-cursor" class="gx-cur" x1="0" x2="0" y1="14" y2="' + y + '" visibility="hidden"></line></svg>';
}
function readout(V, qs, t) {
  var cl = D.clip_len, parts = ["clip " + t + " (" + t * cl + "-" + (t + 1) * cl + " s)"];
  qs.forEach(function (q) {
    var i = q.gt ? q.gt.clips.indexOf(t) : -1, p = q._ps ? q._ps[t] : NaN;
    parts.push("qid " + q.qid + " saliency: predicted " + fmt(p) + (q.gt ? ", annotators " + (i >= 0 ? q.gt.scores[i].join("/") : "0") : ""));
  });
  D.gates.forEach(function (g) {
    var m = V["_m" + g.name], s = V["_s" + g.name];
    if (m && t < m.length) parts.push(g.name + " " + fmt(m[t]) + (s ? " ± " + fmt(s[t]) : ""));
  });
  return parts.join(" · ");
}
function ablation(qs) {
  var F = D.ablation_fields, rows = [];
  if (!F.length) return "";
  qs.forEach(function (q) {
    q.ablation.forEach(function (a) {
      rows.push("<tr><td>" + q.qid + "</td>" + a.map(function (v) { return "<td>" + esc(fmt(v)) + "</td>"; }).join("") + "</tr>");
    });
  });
  return "<h3>Interventions on this video's queries</h3>" + (rows.length ? '<div class="scroll"><table class="gx-ab"><thead><tr><th>qid</th><th>intervention</th>' +
    F.map(function (f) { return "<th>" + esc(f) + "</th>"; }).join("") + "</tr></thead><tbody>" + rows.join("") + "</tbody></table></div>" :
    '<p class="muted">(no intervention rows for these queries)</p>');
}
function open(v, qid) {
  var V = video(v), box = $("gx-detail");
  if (qid === null) qid = V.queries[0].qid;
  st.sel = {v: v, qid: qid};
  Array.prototype.forEach.call(table.tBodies[0].rows, function (tr) {
    tr.classList.toggle("gx-sel", isSel(+tr.getAttribute("data-v"), tr.hasAttribute("data-qid") ? +tr.getAttribute("data-qid") : null));
  });
  var qs = V.queries.slice().sort(function (a, b) { return (b.qid === qid) - (a.qid === qid); });
  box.innerHTML = '<h3 class="gx-head" data-vid="' + esc(V.vid) + '" data-qid="' + qid + '">Video ' + esc(V.vid || "(unknown)") + " · " + fmt(V.n_clips) +
    " clips · " + fmt(V.duration) + " s" + (V.gate_qid !== null ? " · gates stored with qid " + V.gate_qid : "") + "</h3>" +
    '<ul class="gx-queries">' + qs.map(function (q) { return "<li" + (q.qid === qid ? ' class="gx-sel"' : "") + ">qid " + q.qid + ": " + esc(q.query) + metricsText(q.qid) + "</li>"; }).join("") + "</ul>" +
    '<p class="muted">Green: relevant windows and annotator saliency (mean of annotators / 4); blue: predicted windows (top-1 dark) and predicted ' +
    "saliency (scaled to the lane); gate lanes: per-clip mean" + (D.gating_type === "elementwise" ? " with ± std over dims (band)" : "") + ", dashed: reference value.</p>" +
    timeline(V, qs) + '<div id="gx-readout" class="muted">Move the pointer over the timeline for per-clip values.</div>' + ablation(qs);
  var svg = $("gx-svg"), cur = $("gx-cursor"), T = V.n_clips || 0, cl = D.clip_len, dur = Math.max(V.duration || 0, T * cl) || 1;
  svg.addEventListener("mousemove", function (e) {
    var b = svg.getBoundingClientRect(), x = (e.clientX - b.left) * W / (b.width || W), t = Math.floor((x - L) / (W - L - R) * dur / cl);
    if (t < 0 || t >= T) { cur.setAttribute("visibility", "hidden"); return; }
    cur.setAttribute("x1", x); cur.setAttribute("x2", x); cur.setAttribute("visibility", "visible");
    $("gx-readout").textContent = readout(V, qs, t);
  });
}
function fromHash() {
  var h = location.hash || "", clicks = [];
  if (h.indexOf("#gx:") !== 0) return clicks;
  h.slice(4).split("&").forEach(function (kv) {
    var i = kv.indexOf("="), k = kv.slice(0, i), v = decodeURIComponent(kv.slice(i + 1));
    if (k === "view" && D.views[v]) st.view = v;
    else if (k === "sort") { st.dir = v.charAt(0) === "-" ? -1 : 1; st.key = v.replace(/^-/, ""); }
    else if (k === "filter") st.filter = v;
    else if (k === "fit") st.fit = v !== "0";
    else if (k === "q") clicks.push("q:" + v);
    else if (k === "click") clicks = clicks.concat(v.split(","));
  });
  return clicks;
}
try {
  var clicks = fromHash();
  $("gx-view").value = st.view; $("gx-filter").value = st.filter; $("gx-fit").checked = st.fit;
  groups(); render();
  table.tHead.addEventListener("click", function (e) {
    var th = e.target.closest("th"), k = th && th.getAttribute("data-key");
    if (!k) return;
    if (st.key === k) st.dir = -st.dir; else { st.key = k; st.dir = 1; }
    render();
  });
  table.tBodies[0].addEventListener("click", function (e) {
    var tr = e.target.closest("tr");
    if (tr) open(+tr.getAttribute("data-v"), tr.hasAttribute("data-qid") ? +tr.getAttribute("data-qid") : null);
  });
  $("gx-filter").addEventListener("input", function () { st.filter = this.value; st.limit = GX_LIMIT; render(); });
  $("gx-view").addEventListener("change", function () { st.view = this.value; st.key = null; st.dir = 1; groups(); render(); });
  $("gx-groups").addEventListener("change", function (e) { st.hide[e.target.getAttribute("data-g")] = !e.target.checked; render(); });
  $("gx-more").addEventListener("click", function () { st.limit = Infinity; render(); });
  $("gx-fit").addEventListener("change", function () { st.fit = this.checked; if (st.sel) open(st.sel.v, st.sel.qid); });
  clicks.forEach(function (c) {
    var i = c.indexOf(":"), what = c.slice(0, i), arg = c.slice(i + 1), node = null;
    if (what === "q") {
      var r = D.views.queries.rows.find(function (x) { return String(x[1]) === arg; });
      if (r) { open(r[0], r[1]); return; }
    } else if (what === "th") node = Array.prototype.find.call(table.tHead.rows[0].cells, function (th) { return th.getAttribute("data-key") === arg; });
    else if (what === "row") node = table.tBodies[0].rows[+arg];
    if (node) (node.cells ? node.cells[0] : node).click(); else fail("#gx: nothing to click for " + c);
  });
  $("gx").setAttribute("data-state", "ready");
} catch (e) { fail(e && e.stack ? e.stack : e); }
})();
