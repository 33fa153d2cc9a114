// The peerix dashboard: polls /dashboard/api and renders it. Text is always set with
// textContent (path names come from other machines), never parsed as HTML.
"use strict";

const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const k of kids) {
    if (k === null || k === undefined) continue;
    e.append(k instanceof Node ? k : String(k));
  }
  return e;
}

function fill(parent, kids) { parent.replaceChildren(...kids); }

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(n < 10 ? 2 : 1)) + " " + u[i];
}

function duration(s) {
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
}

function ago(ms, now) {
  if (!ms) return "–";
  const s = Math.max(0, Math.round((now - ms) / 1000));
  return s < 5 ? "just now" : duration(s) + " ago";
}

function clock(ms) {
  const d = new Date(ms);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
}

function shortId(id) { return id.length > 20 ? id.slice(0, 8) + "…" + id.slice(-6) : id; }

// /nix/store/<hash>-<name> reads as <name> (the full path in the tooltip).
function pathName(p) {
  const m = /^\/nix\/store\/[0-9a-z]{32}-(.+)$/.exec(p || "");
  return m ? m[1] : (p || "");
}

function figure(value, label) {
  return el("div", { class: "figure" }, el("b", {}, value), el("span", {}, label));
}

function renderNode(n) {
  $("node-id").textContent = n.peer_id;
  $("node-version").textContent = n.version;
  $("node-uptime").textContent = duration(n.uptime_secs);
  $("node-reach").textContent = n.reachability;
  $("node-http").textContent = "http://" + n.http;
  const how = [];
  if (n.mdns) how.push("mDNS on the LAN");
  how.push("Kademlia DHT");
  if (n.explicit_peers.length) how.push(n.explicit_peers.length + " explicit peer(s)");
  $("node-discovery").textContent = how.join(", ");
  const addrs = n.listen.map(a => el("li", {}, a));
  for (const a of n.external) addrs.push(el("li", {}, a + " (external)"));
  fill($("node-addrs"), addrs);
}

function renderTotals(t) {
  fill($("totals-grid"), [
    figure(t.checks, "narinfo checks"),
    figure(t.checks ? Math.round(100 * t.hits / t.checks) + " %" : "–", "answered"),
    figure(t.downloads, "NARs from peers"),
    figure(t.downloads_failed, "failed fetches"),
    figure(t.serves, "NARs to peers"),
    figure(bytes(t.bytes_from_peers), "from peers"),
    figure(bytes(t.bytes_to_peers), "to peers"),
    figure(bytes(t.bytes_to_nix), "to Nix"),
    figure(t.bans, "bans"),
  ]);
}

function renderPeers(peers, now) {
  const connected = peers.filter(p => p.connected).length;
  $("peers-count").textContent = connected + " connected, " + peers.length + " known";
  fill($("peers-body"), peers.map(p => {
    let state;
    if (p.banned) state = el("span", { class: "pill bad", title: p.ban_reason || "" }, "banned");
    else if (p.connected) state = el("span", { class: "pill ok" }, "connected");
    else state = el("span", { class: "pill" }, p.ban_reason ? "was banned" : "away");
    const link = p.connected
      ? (p.relayed ? "relayed" : "direct") + (p.inbound ? ", in" : ", out")
      : "–";
    const row = el("tr", { "data-peer": p.id },
      el("td", { class: "id mono", title: p.id }, p.id),
      el("td", {}, state),
      el("td", { title: p.addr || "" }, link),
      el("td", {}, p.rtt_ms === null || p.rtt_ms === undefined ? "–" : p.rtt_ms.toFixed(1) + " ms"),
      el("td", {}, bytes(p.bytes_from)),
      el("td", {}, bytes(p.bytes_to)),
      el("td", {}, p.connected ? "now, for " + duration(p.connected_secs) : ago(p.last_seen, now)));
    return row;
  }));
}

function renderSharing(s, store) {
  fill($("sharing-grid"), [
    figure(s.total, "paths shared"),
    figure(s.upstream, "in the upstream cache"),
    figure(s.own_signature, "signed by this node"),
    figure(s.pinned, "seeded"),
    figure(s.share_all, "by share-all"),
  ]);
  const why = [];
  why.push(s.upstream_cache ? "upstream: " + s.upstream_cache : "no upstream cache");
  why.push(s.own_key ? "own signing key set" : "no signing key");
  why.push(s.trusted_keys + " trusted key(s)");
  if (s.share_all_on) why.push("share-all on");
  why.push(s.scan_interval_secs ? "rescans every " + duration(s.scan_interval_secs) : "no periodic rescans");
  $("sharing-why").textContent = why.join(" · ");
  const seeds = (store && store.seeds) || [];
  fill($("seeds"), seeds.length
    ? seeds.map(x => el("li", { title: x.root }, el("b", {}, x.label), " — " + x.paths + " paths, " + bytes(x.bytes)))
    : [el("li", { class: "muted" }, "none")]);
}

function renderStore(s) {
  if (s.error) { fill($("store-grid"), [el("span", { class: "muted" }, s.error)]); return; }
  fill($("store-grid"), [
    figure(s.nars, "NARs held"),
    figure(bytes(s.logical_bytes), "logical"),
    figure(bytes(s.stored_bytes), "stored (packs + index)"),
    figure(bytes(s.in_place_bytes), "read in place"),
    figure(bytes(s.dedup_saved_bytes), "saved by dedup (" + s.dedup_ratio.toFixed(2) + "×)"),
    figure(bytes(s.compression_saved_bytes), "saved by zstd"),
    figure(s.pins, "pinned NARs"),
    figure(s.budget_bytes === null ? "none" : bytes(s.budget_bytes), "disk budget"),
  ]);
}

function renderPaths(id, rows, served) {
  fill($(id), rows.length ? rows.map(r => {
    const extra = served
      ? r.count + "× to " + r.peers.map(([p, n]) => shortId(p) + (n > 1 ? " ×" + n : "")).join(", ")
      : r.count + "× asked, " + r.hits + "× found";
    return el("li", { title: r.name }, el("span", { class: "mono" }, pathName(r.name)),
      el("br"), el("span", { class: "muted small" }, extra));
  }) : [el("li", { class: "muted" }, "nothing yet")]);
}

function renderActivity(rows) {
  fill($("activity-list"), rows.length ? rows.map(a => {
    const what = [];
    if (a.path) what.push(pathName(a.path));
    if (a.bytes !== undefined) what.push(bytes(a.bytes));
    if (a.peer) what.push((a.kind === "serve" ? "to " : a.kind === "download" ? "from " : "") + shortId(a.peer));
    if (a.detail) what.push(a.detail);
    return el("li", { class: (a.ok ? "" : "failed ") + "kind-" + a.kind, "data-kind": a.kind },
      el("span", { class: "muted" }, clock(a.at)),
      el("span", { class: "kind" }, a.kind),
      el("span", { class: "what", title: a.path || a.peer || "" }, what.join(" · ")));
  }) : [el("li", { class: "muted" }, "nothing yet")]);
}

function renderChart(t) {
  const svg = $("chart");
  const W = 600, H = 170, L = 84, B = 20, T = 8;
  const samples = t.samples;
  const per = t.interval_secs;
  const slots = 600 / per;
  const rate = s => ({ from: s.from_peers / per, to: s.to_peers / per, nix: s.to_nix / per });
  const rates = samples.map(rate);
  let max = 1;
  for (const r of rates) max = Math.max(max, r.from, r.to, r.nix);
  const kids = [];
  for (let i = 0; i <= 2; i++) {
    const y = T + (H - B - T) * i / 2;
    kids.push(svgEl("line", { class: "grid", x1: L, x2: W, y1: y, y2: y }));
    const label = svgEl("text", { x: L - 6, y: y + 4, "text-anchor": "end" });
    label.textContent = bytes(max * (2 - i) / 2) + "/s";
    kids.push(label);
  }
  const x = i => L + (W - L) * (slots - (rates.length - 1 - i) - 1) / (slots - 1);
  const y = v => T + (H - B - T) * (1 - v / max);
  for (const k of ["from", "to", "nix"]) {
    const pts = rates.map((r, i) => x(i).toFixed(1) + "," + y(r[k]).toFixed(1)).join(" ");
    kids.push(svgEl("polyline", { class: k, points: pts }));
  }
  for (const [label, at] of [["−10 min", L], ["−5 min", L + (W - L) / 2], ["now", W]]) {
    const tx = svgEl("text", { x: at, y: H - 4, "text-anchor": at === W ? "end" : at === L ? "start" : "middle" });
    tx.textContent = label;
    kids.push(tx);
  }
  fill(svg, kids);
  const last = rates[rates.length - 1];
  $("chart-now").textContent = last
    ? " · now: " + bytes(last.from) + "/s in, " + bytes(last.to) + "/s out, " + bytes(last.nix) + "/s to Nix"
    : "";
}

function svgEl(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

async function refresh() {
  try {
    const r = await fetch("/dashboard/api", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    const d = await r.json();
    renderNode(d.node);
    renderTotals(d.totals);
    renderChart(d.throughput);
    renderPeers(d.peers, d.now);
    renderSharing(d.sharing, d.store);
    renderStore(d.store);
    renderPaths("requested-list", d.top_requested, false);
    renderPaths("served-list", d.top_served, true);
    renderActivity(d.activity);
    $("status").textContent = "updated " + clock(d.now);
    document.body.dataset.loaded = "yes";
  } catch (e) {
    $("status").textContent = "cannot reach the daemon: " + e.message;
  }
}

refresh();
setInterval(refresh, POLL_MS);
