// gliofed dashboard: renders /api/run snapshots; live through server-sent events (polling as fallback).
"use strict";

let SNAP = null;
let SKEW = 0; // client clock minus server clock, seconds

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
const num = (v) => (typeof v === "number" && isFinite(v) ? v : null);
const f3 = (v) => (num(v) === null ? "n/a" : v.toFixed(3));
const serverNow = () => Date.now() / 1000 - SKEW;

function dur(s) {
  if (num(s) === null) return "n/a";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function badge(state) {
  return `<span class="badge st-${esc(state)}">${esc(state)}</span>`;
}

function siteColors(names) {
  const out = {};
  names.forEach((n, i) => { out[n] = Charts.PALETTE[(i + 1) % Charts.PALETTE.length]; });
  return out;
}

function allSites(snap) {
  const names = new Set(Object.keys((snap.status || {}).sites || {}));
  for (const r of snap.rounds) {
    Object.keys(r.sites || {}).forEach((s) => names.add(s));
    Object.keys(r.site_train_seconds || {}).forEach((s) => names.add(s));
  }
  return [...names].sort();
}

function renderHeader(snap) {
  const st = snap.status || {};
  $("title").textContent = `Federated ${snap.task}: ${snap.name}`;
  const mode = st.mode ? `${st.mode} · ` : "";
  const privacy = st.dp && st.dp !== "none" ? ` · DP ${st.dp}` : "";
  const secagg = st.secagg ? " · SecAgg+" : "";
  $("subtitle").textContent = `${mode}strategy ${st.strategy || snap.config.strategy || "?"} · ` +
    `${snap.num_rounds} rounds · quorum ${st.min_available_nodes ?? "?"} sites${privacy}${secagg}`;
  $("state").className = `badge st-${snap.state}`;
  $("state").textContent = snap.state;
  $("run-dir").textContent = snap.run_dir;
  document.title = `gliofed: ${snap.name} (${snap.state})`;
}

function renderProgress(snap) {
  const st = snap.status || {};
  const rnd = st.round || {};
  const now = serverNow();
  const done = snap.rounds.length ? snap.rounds[snap.rounds.length - 1].round : 0;
  const total = snap.num_rounds || done;
  const secs = snap.rounds.map((r) => r.seconds).filter((v) => num(v) !== null);
  const mean = secs.length ? secs.reduce((a, b) => a + b, 0) / secs.length : null;
  const items = [];
  let frac = total ? done / total : 0;
  items.push(["rounds finished", `${done} / ${total}`]);
  if (["running", "waiting"].includes(snap.state)) {
    const current = rnd.number ?? done + 1;
    const elapsed = num(rnd.started) !== null ? now - rnd.started : null;
    items.push(["round in progress", `${current} (${rnd.phase || "?"})`]);
    items.push(["round elapsed", dur(elapsed)]);
    if (num(rnd.deadline) !== null) {
      const left = rnd.deadline - now;
      items.push([`${rnd.phase === "waiting for sites" ? "quorum" : "reply"} deadline`,
        left > 0 ? `in ${dur(left)}` : `passed ${dur(-left)} ago`]);
    }
    if (mean !== null) {
      const thisLeft = Math.max(0, mean - (elapsed || 0));
      items.push(["est. left this round", dur(thisLeft)]);
      items.push(["est. left in run", dur(thisLeft + mean * Math.max(0, total - current))]);
      if (total) frac = Math.min(1, (done + Math.min(1, (elapsed || 0) / mean)) / total);
    } else {
      items.push(["est. left", "after the first round"]);
    }
  } else if (snap.state === "finished") {
    const wall = num(st.finished) !== null && num(st.started) !== null ? st.finished - st.started : null;
    items.push(["finished", wall !== null ? `in ${dur(wall)}` : "yes"]);
    frac = 1;
  } else if (st.reason) {
    items.push(["reason", st.reason]);
  }
  if (mean !== null) items.push(["mean round time", dur(mean)]);
  $("progress-bar").style.width = `${(100 * frac).toFixed(1)}%`;
  $("progress").innerHTML = items.map(([k, v]) => `<div><b>${esc(k)}</b>${esc(v)}</div>`).join("");
}

function renderSites(snap) {
  const st = snap.status || {};
  const sites = st.sites || {};
  const last = snap.rounds[snap.rounds.length - 1] || {};
  const now = serverNow();
  const rows = allSites(snap).map((name) => {
    const s = sites[name] || { state: "done" };
    const t = (last.site_train_seconds || {})[name];
    const eps = (snap.epsilon[name] || {}).spent;
    const seen = num(s.last_seen) !== null ? `${dur(now - s.last_seen)} ago` : "n/a";
    return `<tr data-site="${esc(name)}"><td><b>${esc(name)}</b></td><td class="num">${esc(s.node_id ?? "")}</td>` +
      `<td>${badge(s.state)}</td><td class="reason">${esc(s.reason || "")}</td><td>${seen}</td>` +
      `<td class="num">${esc(s.rounds_trained ?? "")}</td><td class="num">${num(t) === null ? "" : t.toFixed(1) + " s"}</td>` +
      `<td class="num">${num(eps) === null ? "" : eps.toFixed(2)}</td></tr>`;
  });
  $("sites").querySelector("tbody").innerHTML = rows.join("") ||
    `<tr><td colspan="8" class="muted">no site has connected yet</td></tr>`;
}

function renderCharts(snap) {
  const key = snap.headline;
  const names = allSites(snap);
  const colors = siteColors(names);
  const rounds = snap.rounds;
  $("lc-metric").textContent = `(${key}${snap.lower_is_better ? ", lower is better" : ""})`;
  const pooled = { name: `pooled ${key} (95% CI band)`, color: Charts.PALETTE[0], width: 3,
    points: rounds.map((r) => [r.round, num((r.pooled || {})[key])]),
    band: rounds.filter((r) => ((snap.cis[r.round] || {}).pooled || {})[key])
      .map((r) => [r.round, ...snap.cis[r.round].pooled[key]]) };
  const series = [pooled];
  if (rounds.some((r) => r.central && num(r.central[key]) !== null)) {
    series.push({ name: `server test set ${key}`, dashed: true, color: "#111827",
      points: rounds.map((r) => [r.round, num((r.central || {})[key])]) });
  }
  const bounded = ["auc", "accuracy", "balanced_accuracy"].includes(key);
  Charts.line($("chart-learning"), series, { xlabel: "round", ylabel: key,
    ymin: bounded ? 0 : undefined, ymax: bounded ? 1 : undefined, empty: "no finished round yet" });

  // a site whose test split holds one class has no AUC: fall back to balanced accuracy
  const hasKey = rounds.some((r) => Object.values(r.sites || {}).some((m) => num(m[key]) !== null));
  const siteKey = hasKey || !rounds.length ? key : "balanced_accuracy";
  $("ps-metric").textContent = `(${siteKey}${siteKey !== key ? `: no site has a per-site ${key}` : ""})`;
  const evaluated = names.filter((n) => rounds.some((r) => (r.sites || {})[n]));
  Charts.line($("chart-sites"), evaluated.map((n) => ({ name: n, color: colors[n],
    points: rounds.map((r) => [r.round, num(((r.sites || {})[n] || {})[siteKey])]) })),
    { xlabel: "round", ylabel: `${siteKey}, site's test split`, ymin: siteKey === "param_mae" ? undefined : 0,
      ymax: siteKey === "param_mae" ? undefined : 1, empty: "no site has evaluated yet" });

  const cats = rounds.map((r) => String(r.round));
  const trained = names.filter((n) => rounds.some((r) => num((r.site_train_seconds || {})[n]) !== null));
  const timeSeries = trained.map((n) => {
    const values = rounds.map((r) => num((r.site_train_seconds || {})[n]));
    const flags = rounds.map((r, i) => isStraggler(r.site_train_seconds || {}, values[i]));
    return { name: n, color: colors[n], values, colors: flags.map((f) => (f ? "#dc2626" : null)),
             classes: flags.map((f) => (f ? "straggler" : "")) };
  });
  Charts.bars($("chart-time"), cats, timeSeries, { xlabel: "round", ylabel: "seconds",
    empty: "no training time reported yet" });

  Charts.bars($("chart-bytes"), cats, [
    { name: "sent (MiB)", values: rounds.map((r) => (r.bytes_sent || 0) / 2 ** 20), color: "#2563eb" },
    { name: "received (MiB)", values: rounds.map((r) => (r.bytes_received || 0) / 2 ** 20), color: "#16a34a" },
  ], { xlabel: "round", ylabel: "MiB", empty: "no finished round yet" });

  const epsNames = Object.keys(snap.epsilon).sort();
  const budget = epsNames.length ? snap.epsilon[epsNames[0]].budget : null;
  const dp = (snap.status || {}).dp || snap.config.dp || "none";
  Charts.bars($("chart-eps"), epsNames, [{ name: "ε spent (bar colour = site)", color: "#9ca3af", values: epsNames.map((n) => snap.epsilon[n].spent),
    colors: epsNames.map((n) => colors[n]) }], { ylabel: "ε", refs: budget ? [{ value: budget, label: `budget ε=${budget}` }] : [],
    empty: dp === "none" ? "no differential privacy in this run (dp = none)"
      : dp === "central" ? "site-level DP: ε is accounted at the server (see rounds.jsonl dp)" : "no ε reported yet" });
}

// a straggler trains 1.5x longer (and 1 s more) than the median of the other sites that round
function isStraggler(row, v) {
  if (num(v) === null) return false;
  const vals = Object.values(row).filter((x) => num(x) !== null).sort((a, b) => a - b);
  vals.splice(vals.indexOf(v), 1);
  if (!vals.length) return false;
  const mid = vals.length % 2 ? vals[(vals.length - 1) / 2] : (vals[vals.length / 2 - 1] + vals[vals.length / 2]) / 2;
  return v > 1.5 * mid && v - mid > 1.0;
}

// an interval is shown only around its estimate: a site's exact AUC can fall outside the interval
// drawn from binned scores when its scores crowd into one histogram bin
function withCi(v, ci) {
  if (num(v) === null) return "n/a";
  return ci && ci[0] <= v + 1e-9 && v - 1e-9 <= ci[1] ? `${v.toFixed(3)} <span class="muted">[${ci[0].toFixed(3)}, ${ci[1].toFixed(3)}]</span>` : v.toFixed(3);
}

function renderMetrics(snap) {
  const last = snap.rounds[snap.rounds.length - 1];
  const table = $("metrics");
  if (!last) {
    table.querySelector("thead").innerHTML = "";
    table.querySelector("tbody").innerHTML = `<tr><td class="muted">no finished round yet</td></tr>`;
    return;
  }
  $("metrics-round").textContent = `(round ${last.round})`;
  const key = snap.headline;
  const keys = [key, ...["balanced_accuracy", "accuracy"].filter((k) => k !== key && (last.pooled || {})[k] !== undefined)];
  const ci = snap.cis[last.round] || null;
  table.querySelector("thead").innerHTML = `<tr><th>scope</th>${keys.map((k) => `<th class="num">${esc(k)}</th>`).join("")}<th class="num">test cases (n)</th></tr>`;
  const row = (label, m, cis) => `<tr><td>${label}</td>${keys.map((k) => `<td class="num">${withCi(num((m || {})[k]), (cis || {})[k])}</td>`).join("")}` +
    `<td class="num">${esc((m || {})["num_examples"] ?? (m || {})["num-examples"] ?? "")}</td></tr>`;
  const rows = [row("<b>pooled</b> (all sites' test splits)", last.pooled, ci && ci.pooled)];
  if (last.central) rows.push(row("server test set", last.central, null));
  for (const [name, m] of Object.entries(last.sites || {}).sort()) {
    rows.push(row(esc(name), m, ci && (ci.sites || {})[name]));
  }
  table.querySelector("tbody").innerHTML = rows.join("");
  $("ci-note").textContent = ci
    ? "Brackets: bootstrap 95% CI over test cases (1000 resamples of the confusion matrices and score histograms the sites sent; an AUC interval is left out where a site's exact AUC lies outside the interval of its binned scores)."
    : "No per-case counts in this run folder, so no confidence intervals; n is the number of test cases.";
}

function renderBest(snap) {
  const b = snap.best;
  const items = b ? [["best round", b.round], ["by", b.metric], ["value", f3(b.value)], ["from", b.source]]
    : [["best round", "after the first evaluated round"]];
  const ck = snap.checkpoints || [];
  if (ck.length) {
    const mib = ck.reduce((a, c) => a + c.bytes, 0) / 2 ** 20;
    items.push(["checkpoints", `${ck.length} files, ${mib.toFixed(1)} MiB`]);
  }
  $("best").innerHTML = items.map(([k, v]) => `<div><b>${esc(k)}</b>${esc(v)}</div>`).join("");
  const links = [];
  if (snap.links.report) links.push(`<a href="files/report.html">report.html</a>`);
  if (snap.links.model) links.push(`<a href="files/model.zip">exported model (model.zip)</a>`);
  if (snap.links.sites_log) links.push(`<a href="files/sites.log">sites.log</a> (each round's outcome per site)`);
  links.push(`<a href="files/rounds.jsonl">rounds.jsonl</a>`);
  if (!snap.links.report) links.push(`<span class="muted">report.html: written when the run ends</span>`);
  $("links").innerHTML = links.map((l) => `<li>${l}</li>`).join("");
}

function render(snap) {
  SNAP = snap;
  SKEW = Date.now() / 1000 - snap.now;
  renderHeader(snap);
  renderProgress(snap);
  renderSites(snap);
  renderCharts(snap);
  renderMetrics(snap);
  renderBest(snap);
}

function connect() {
  const poll = () => fetch("api/run", { cache: "no-store" }).then((r) => r.json()).then(render)
    .catch(() => { $("live").textContent = "server unreachable"; });
  if (window.EventSource) {
    const es = new EventSource("api/events");
    es.onmessage = (ev) => { $("live").textContent = "live"; render(JSON.parse(ev.data)); };
    es.onerror = () => { $("live").textContent = "reconnecting…"; };
  } else {
    setInterval(poll, 3000);
  }
  const first = document.getElementById("snapshot");
  if (first) render(JSON.parse(first.textContent)); else poll();
  setInterval(() => { if (SNAP) { renderProgress(SNAP); renderSites(SNAP); } }, 1000);
}

connect();
