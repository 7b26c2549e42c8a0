// gliofed's small SVG charting code (no dependencies, no CDN): line charts with optional confidence
// bands, grouped bar charts with optional reference lines. Each call redraws its container.
"use strict";

const Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2", "#ca8a04", "#db2777",
                   "#4b5563", "#65a30d", "#dc2626"];
  const M = { top: 14, right: 14, bottom: 38, left: 52 };

  function el(name, attrs, parent, text) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  function niceTicks(lo, hi, n) {
    if (!isFinite(lo) || !isFinite(hi)) return [0, 1];
    if (lo === hi) { lo -= 0.5; hi += 0.5; }
    const raw = (hi - lo) / Math.max(1, n);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => raw <= s) || 10 * mag;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toFixed(10));
    return out;
  }

  function fmt(v) {
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(1) + "G";
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
    return a >= 10 || v === 0 ? String(+v.toFixed(1)) : String(+v.toFixed(3));
  }

  function frame(container, opts, ylo, yhi) {
    container.innerHTML = "";
    const w = opts.width || container.clientWidth || 420, h = opts.height || 220;
    const svg = el("svg", { viewBox: `0 0 ${w} ${h}`, width: "100%", height: h, role: "img",
                            "aria-label": opts.title || "" }, container);
    const iw = w - M.left - M.right, ih = h - M.top - M.bottom;
    const ticks = niceTicks(ylo, yhi, 4);
    const y0 = Math.min(ylo, ticks[0]), y1 = Math.max(yhi, ticks[ticks.length - 1]);
    const y = (v) => M.top + ih - ((v - y0) / (y1 - y0 || 1)) * ih;
    for (const t of ticks) {
      el("line", { x1: M.left, x2: M.left + iw, y1: y(t), y2: y(t), class: "grid" }, svg);
      el("text", { x: M.left - 6, y: y(t) + 4, class: "tick", "text-anchor": "end" }, svg, fmt(t));
    }
    if (opts.ylabel) {
      el("text", { x: 12, y: M.top + ih / 2, class: "axis-label", "text-anchor": "middle",
                   transform: `rotate(-90 12 ${M.top + ih / 2})` }, svg, opts.ylabel);
    }
    if (opts.xlabel) {
      el("text", { x: M.left + iw / 2, y: h - 4, class: "axis-label", "text-anchor": "middle" }, svg,
         opts.xlabel);
    }
    return { svg, iw, ih, y, w, h };
  }

  function legend(container, items) {
    const box = document.createElement("div");
    box.className = "legend";
    for (const it of items) {
      const span = document.createElement("span");
      span.innerHTML = `<i style="background:${it.color}"></i>`;
      span.appendChild(document.createTextNode(it.name));
      box.appendChild(span);
    }
    container.appendChild(box);
  }

  // series: [{name, points: [[x, y]], band: [[x, lo, hi]], color, dashed}]
  function line(container, series, opts = {}) {
    const xs = series.flatMap((s) => s.points.map((p) => p[0]));
    const ys = series.flatMap((s) => s.points.map((p) => p[1]).concat((s.band || []).flatMap((b) => [b[1], b[2]])))
      .filter((v) => v !== null && isFinite(v));
    if (!xs.length || !ys.length) {
      container.innerHTML = `<p class="empty">${opts.empty || "no data yet"}</p>`;
      return;
    }
    const ylo = opts.ymin !== undefined ? Math.min(opts.ymin, ...ys) : Math.min(...ys);
    const yhi = opts.ymax !== undefined ? Math.max(opts.ymax, ...ys) : Math.max(...ys);
    const f = frame(container, opts, ylo, yhi);
    const xlo = Math.min(...xs), xhi = Math.max(...xs);
    const x = (v) => M.left + (xhi === xlo ? f.iw / 2 : ((v - xlo) / (xhi - xlo)) * f.iw);
    for (const t of niceTicks(xlo, xhi, Math.min(8, xhi - xlo || 1)).filter((t) => Number.isInteger(t))) {
      el("text", { x: x(t), y: M.top + f.ih + 16, class: "tick", "text-anchor": "middle" }, f.svg, t);
    }
    series.forEach((s, i) => {
      const color = s.color || PALETTE[i % PALETTE.length];
      s.color = color;
      const band = (s.band || []).filter((b) => b[1] !== null && b[2] !== null);
      if (band.length) {
        const d = band.map((b, j) => `${j ? "L" : "M"}${x(b[0])},${f.y(b[2])}`).join("") +
          band.slice().reverse().map((b) => `L${x(b[0])},${f.y(b[1])}`).join("") + "Z";
        el("path", { d, fill: color, "fill-opacity": 0.15, stroke: "none" }, f.svg);
      }
      const pts = s.points.filter((p) => p[1] !== null && isFinite(p[1]));
      if (pts.length > 1) {
        el("path", { d: pts.map((p, j) => `${j ? "L" : "M"}${x(p[0])},${f.y(p[1])}`).join(""),
                     fill: "none", stroke: color, "stroke-width": s.width || 2,
                     "stroke-dasharray": s.dashed ? "5 4" : "" }, f.svg);
      }
      for (const p of pts) {
        const c = el("circle", { cx: x(p[0]), cy: f.y(p[1]), r: s.radius || 3, fill: color }, f.svg);
        el("title", {}, c, `${s.name}, round ${p[0]}: ${fmt(p[1])}`);
      }
    });
    legend(container, series);
  }

  // categories: x labels; series: [{name, values: [..], color, colors: [per-bar override]}];
  // opts.refs: [{value, label, color}] horizontal reference lines
  function bars(container, categories, series, opts = {}) {
    const vals = series.flatMap((s) => s.values).filter((v) => v !== null && isFinite(v));
    const refs = (opts.refs || []).filter((r) => r.value !== null && isFinite(r.value));
    if (!categories.length || !vals.length) {
      container.innerHTML = `<p class="empty">${opts.empty || "no data yet"}</p>`;
      return;
    }
    const f = frame(container, opts, 0, Math.max(...vals, ...refs.map((r) => r.value)) * 1.05 || 1);
    const group = f.iw / categories.length;
    const bw = Math.max(2, Math.min(28, (group * 0.8) / series.length));
    categories.forEach((cat, ci) => {
      const gx = M.left + ci * group + (group - bw * series.length) / 2;
      series.forEach((s, si) => {
        const v = s.values[ci];
        if (v === null || !isFinite(v)) return;
        const color = (s.colors && s.colors[ci]) || s.color || PALETTE[si % PALETTE.length];
        const r = el("rect", { x: gx + si * bw, y: f.y(v), width: bw - 1, height: f.y(0) - f.y(v),
                               fill: color, class: s.classes && s.classes[ci] ? s.classes[ci] : "" },
                     f.svg);
        el("title", {}, r, `${s.name}, ${cat}: ${fmt(v)}`);
      });
      el("text", { x: M.left + ci * group + group / 2, y: M.top + f.ih + 16, class: "tick",
                   "text-anchor": "middle" }, f.svg, cat);
    });
    for (const r of refs) {
      el("line", { x1: M.left, x2: M.left + f.iw, y1: f.y(r.value), y2: f.y(r.value),
                   stroke: r.color || "#dc2626", "stroke-dasharray": "6 4", "stroke-width": 1.5 }, f.svg);
      el("text", { x: M.left + f.iw - 4, y: f.y(r.value) - 4, class: "tick", "text-anchor": "end",
                   fill: r.color || "#dc2626" }, f.svg, r.label);
    }
    series.forEach((s, i) => { s.color = s.color || PALETTE[i % PALETTE.length]; });
    legend(container, series.concat(refs.map((r) => ({ name: r.label, color: r.color || "#dc2626" }))));
  }

  return { line, bars, PALETTE, fmt };
})();
