// mechvit feature explorer: vanilla JS, no network, no build step. The data is the JSON in
// <script id="explorer-data">; quantised arrays are base64 uint8 and decoded on first use.
"use strict";
(function () {
  const T0 = performance.now(); // the HTML (data included) is parsed when this script starts
  const D = JSON.parse(document.getElementById("explorer-data").textContent);
  const T1 = performance.now();
  const ROW = 24;
  const C = D.class_names.length;
  const $ = (s, el) => (el || document).querySelector(s);
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  // Numbers as text on mechvit's one rounding rule (mechvit/_numbers.py, fmt_fixed and fmt_sig): round half up
  // (away from zero at an exact tie) on the number's decimal value, its shortest repr (String(x), as Python's
  // repr) first rounded to 12 significant digits (half even) to remove float noise when the final rounding keeps
  // fewer; scaling (x 100 for a percentage) is exact, on that decimal; never "-0". toFixed and toPrecision round
  // the binary value instead: (1.005).toFixed(2) is "1.00" (the float is 1.00499999...), (0.9065 * 100).toFixed(1)
  // is "90.6" (90.64999999999999), (-0.0004).toFixed(3) is "-0.000"; here "1.01", "90.7" and "0.000". The
  // arithmetic is on integers (BigInt); null, undefined and NaN print as "–", the infinities as Python's.
  const NOISE_DIGITS = 12;
  const pow10 = (k) => 10n ** BigInt(k);
  const ndigits = (m) => m.toString().length; // m > 0
  const decimalOf = (x) => {
    // |x| = m × 10^e (m a BigInt), from its shortest repr: "56.25", "1e-7", "1.5e+300"
    const [, int, frac = "", exp = "0"] = /^(\d+)(?:\.(\d+))?(?:e([+-]?\d+))?$/.exec(String(Math.abs(x)));
    return { m: BigInt(int + frac), e: Number(exp) - frac.length };
  };
  const roundTo = (m, e, q, even) => {
    // m × 10^e rounded to a multiple of 10^q, half up (half even with even): how many 10^q, a BigInt
    if (e >= q) return m * pow10(e - q);
    const div = pow10(q - e), n = m / div, r2 = 2n * (m % div);
    return r2 > div || (r2 === div && (!even || n % 2n === 1n)) ? n + 1n : n;
  };
  const decimalValue = (x, scale, kept) => {
    // scale × x as ±m × 10^e, x cleaned of noise when the final rounding keeps fewer than 12 significant digits
    // (kept: their number, given floor(log10(|scale × x|)))
    let { m, e } = decimalOf(x);
    const s = decimalOf(scale);
    if (m !== 0n && s.m !== 0n && kept(ndigits(m * s.m) - 1 + e + s.e) < NOISE_DIGITS) {
      const q = ndigits(m) - NOISE_DIGITS + e;
      m = roundTo(m, e, q, true);
      e = q;
    }
    return { neg: (x < 0) !== (scale < 0), m: m * s.m, e: e + s.e };
  };
  const special = (x, scale) => {
    // the text of a number that is not finite, else null
    if (x === null || x === undefined || Number.isNaN(Number(x))) return "–";
    const y = Number(x) * scale;
    return Number.isFinite(Number(x)) ? null : Number.isNaN(y) ? "–" : y < 0 ? "-inf" : "inf";
  };
  const fixedText = (q, d) => {
    // q × 10^-d (q >= 0) with d decimals
    const s = q.toString().padStart(d + 1, "0");
    return d ? s.slice(0, -d) + "." + s.slice(-d) : s;
  };
  const sigRound = (x, digits, scale) => {
    // scale × x to `digits` significant digits, half up: ±q × 10^(e - digits + 1), e the exponent after rounding
    const v = decimalValue(x, scale, () => digits);
    if (v.m === 0n) return { neg: false, q: 0n, e: 0 };
    let e = ndigits(v.m) - 1 + v.e, q = roundTo(v.m, v.e, e - digits + 1, false);
    if (q === pow10(digits)) { q /= 10n; e += 1; } // 9.995 -> 10.0: one more digit before the point
    return { neg: v.neg, q, e };
  };
  function fmtFixed(x, decimals, scale = 1) {
    // fmt_fixed: (scale × x).toFixed(decimals), rounded half up on the decimal value; never "-0.00"
    const sp = special(x, scale);
    if (sp !== null) return sp;
    const v = decimalValue(Number(x), scale, (mag) => mag + 1 + decimals);
    const q = roundTo(v.m, v.e, -decimals, false);
    return (v.neg && q !== 0n ? "-" : "") + fixedText(q, decimals);
  }
  function fmtSig(x, digits = 3, scale = 1) {
    // fmt_sig: Python's format(scale × x, ".{digits}g") (trailing zeros stripped, exponent from 1e-05 and from
    // 10^digits), rounded half up on the decimal value; never "-0"
    const sp = special(x, scale);
    if (sp !== null) return sp;
    const p = Math.max(1, digits), { neg, q, e } = sigRound(Number(x), p, scale);
    if (q === 0n) return "0";
    const sign = neg ? "-" : "";
    if (-4 <= e && e < p) {
      const t = fixedText(q, p - 1 - e);
      return sign + (t.includes(".") ? t.replace(/0+$/, "").replace(/\.$/, "") : t);
    }
    const s = q.toString(), mantissa = (s[0] + "." + s.slice(1)).replace(/0+$/, "").replace(/\.$/, "");
    return `${sign}${mantissa}e${e < 0 ? "-" : "+"}${String(Math.abs(e)).padStart(2, "0")}`;
  }
  const clean = (x) => Number(fmtSig(x, NOISE_DIGITS)); // x without its float noise, for a threshold
  const fmt = (v, d) => fmtFixed(v, d);
  const fmtSigned = (v, d) => {
    // "+0.12" / "-0.12": the sign always shown ("+" for one that rounds to zero)
    const t = fmtFixed(v, d);
    return t === "–" || t.startsWith("-") ? t : "+" + t;
  };
  const fmtDensity = (v) => {
    // always a percentage: two decimals from 0.1% up ("0.10%", "60.80%"), two significant digits below ("0.0041%"),
    // half up on the decimal value (fmtFixed); 0.1% or more is decided after the rounding (0.0999% reads 0.10%)
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (v <= 0) return "0%";
    const { e } = sigRound(v, 2, 100);
    return fmtFixed(v, e >= -1 ? 2 : 1 - e, 100) + "%";
  };
  const CORR = D.images.corrupted_name || "corrupted";
  const BASES = D.effect_bases || ["clean", "corrupted", "none"];
  function basisOf(s, i) {
    // what the direct logit effect of the i-th listed latent is computed at: "clean" (its mean activation on the
    // clean tokens where it fires), "corrupted" (never fires on a clean token: its mean on the corrupted ones) or
    // "none" (not measured). Older pages computed every effect at the clean mean, which was 0 for a latent that
    // never fires on a clean token: not measured either.
    if (s.effect_basis) return BASES[s.effect_basis[i]];
    return s.density[i] > 0 ? "clean" : "none";
  }
  function ablationSetOf(s, i) {
    // the images the ablate/double probabilities (p_abl, p_dbl) of the i-th listed latent were measured on: "clean"
    // (its top clean images), "corrupted" (its top corrupted images: it never fires on a clean token) or "none"
    // (not measured). Pages before mechvit-explorer/5 measured them on the clean top images only: a latent with no
    // clean image had none measured.
    if (s.ablation_set) return BASES[s.ablation_set[i]];
    return basisOf(s, i) === "clean" ? "clean" : "none";
  }
  function labelSetOf(s, i) {
    // the images the label (and class counts) of the i-th listed latent come from: "clean" (its top clean images),
    // "corrupted" (its top corrupted images: it never fires on a clean token) or "none" (it never fires: "-").
    // Pages before mechvit-explorer/6 labelled every latent from its clean top images: "-" without one.
    if (s.label_set) return BASES[s.label_set[i]];
    return sum(s.class_counts[i]) > 0 ? "clean" : "none";
  }
  const LABEL_MARK = "corrupted images"; // marks a label from the top corrupted images (FeatureStats.shown_label)
  // the label as text (searched, sorted, on the card): marked when it comes from the top corrupted images
  const labelText = (s, i) => s.label[i] + (labelSetOf(s, i) === "corrupted" ? ` (${LABEL_MARK})` : "");
  function labelHtml(s, i) {
    // the label with its mark as a tag saying where it comes from (the same text as labelText)
    if (labelSetOf(s, i) !== "corrupted") return esc(s.label[i]);
    const n = sum(s.class_counts[i]);
    const why = `from its top ${n} ${CORR} image${n === 1 ? "" : "s"}: it never fires on a clean image`;
    return `${esc(s.label[i])} <span class="lset" title="${esc(why)}">(${LABEL_MARK})</span>`;
  }
  // the images a set's top images index: their labels and the condition a corrupted one came from
  const setLabels = (set) => (set === "clean" ? D.images.labels : D.images.labels_corrupted);
  const hasImages = (s, i, set) => { const t = set === "clean" ? s.top : s.top_c; return !!(t && t[i].some((v) => v >= 0)); };
  const sum = (a) => a.reduce((x, y) => x + y, 0);
  // mean activation on the clean tokens where the latent fires: null when it never does (older pages stored 0)
  const meanAct = (s, i) => (s.density[i] > 0 ? s.mean_act[i] : null);

  function argmax(a) {
    // index of the largest value (no spread: safe for any number of latents); nulls never win
    let best = 0;
    for (let i = 1; i < a.length; i++) if (a[i] !== null && (a[best] === null || a[i] > a[best])) best = i;
    return best;
  }

  function b64(s) {
    const bin = atob(s);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  const decoded = new Map();
  function arr(obj, key) {
    // lazily decoded uint8 arrays, cached per object and key
    if (!obj[key]) return null;
    let m = decoded.get(obj);
    if (!m) decoded.set(obj, (m = {}));
    if (!m[key]) {
      m[key] = b64(obj[key]);
      if (D.map_bits === 4 && (key === "maps" || key === "maps_c")) {
        // 4-bit levels, two per byte (high nibble first) -> 0-255 like an 8-bit map
        const packed = m[key], n = obj.n_map_values, out = new Uint8Array(n);
        for (let i = 0; i < n; i++) out[i] = 17 * (i % 2 ? packed[i >> 1] & 15 : packed[i >> 1] >> 4);
        m[key] = out;
      }
    }
    return m[key];
  }

  function logitRow(s, i) {
    // direct logit effects of the i-th listed latent: base64 of little-endian int16 [live, classes] times
    // s.logit_scale, -32768 = not measured (NaN); a list of rows in older pages
    if (Array.isArray(s.logit)) return s.logit[i];
    let m = decoded.get(s);
    if (!m) decoded.set(s, (m = {}));
    if (!m["logit/f"]) {
      const u8 = arr(s, "logit"), out = new Float32Array(u8.length / 2);
      for (let j = 0; j < out.length; j++) {
        const q = u8[2 * j] | (u8[2 * j + 1] << 8);
        out[j] = q === 32768 ? NaN : (q > 32768 ? q - 65536 : q) * s.logit_scale;
      }
      m["logit/f"] = out;
    }
    const C = D.class_names.length;
    return Array.from(m["logit/f"].subarray(i * C, (i + 1) * C));
  }

  function probs(obj, key) {
    // probabilities: base64 of little-endian uint16 over [0, D.prob_max] (uint8 over [0, 255] in older pages)
    const max = D.prob_max || 255;
    let m = decoded.get(obj);
    if (!m) decoded.set(obj, (m = {}));
    const k = key + "/p";
    if (!m[k]) {
      const u8 = arr(obj, key);
      if (max === 255) m[k] = Float32Array.from(u8, (q) => q / 255);
      else {
        const out = new Float32Array(u8.length / 2);
        for (let i = 0; i < out.length; i++) out[i] = (u8[2 * i] | (u8[2 * i + 1] << 8)) / max;
        m[k] = out;
      }
    }
    return m[k];
  }

  // ---- images: sprite sheets decoded once into canvases -------------------------------------------------------
  const sprites = {};
  const spriteReady = {};
  for (const set of ["clean", "corrupted"]) {
    if (!D.images[set]) continue;
    const img = new Image();
    spriteReady[set] = new Promise((res) => { img.onload = res; img.onerror = res; });
    img.src = D.images[set].sprite;
    sprites[set] = img;
  }
  const IH = D.images.h, IW = D.images.w;

  // A colour map for the heatmap overlay (transparent -> orange -> yellow), alpha grows with the activation.
  function heat(q) {
    const t = q / 255;
    const r = 255, g = Math.round(60 + 180 * t), b = Math.round(20 * (1 - t));
    return `rgba(${r},${g},${b},${(0.1 + 0.65 * t).toFixed(3)})`;
  }

  function drawImage(canvas, set, imgIdx, map, scale) {
    drawImageOf(S(), canvas, set, imgIdx, map, scale);
  }

  function drawImageOf(sae, canvas, set, imgIdx, map, scale) {
    // map: Uint8Array(gh*gw) quantised activations (0-255 of the latent's max) on sae's grid, or null
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.fillStyle = "#ddd";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    const meta = D.images[set];
    const paint = () => {
      if (imgIdx >= 0) {
        const sx = (imgIdx % meta.cols) * IW, sy = Math.floor(imgIdx / meta.cols) * IH;
        ctx.drawImage(sprites[set], sx, sy, IW, IH, 0, 0, IW * scale, IH * scale);
      }
      if (!map) return;
      const [gh, gw] = sae.grid;
      const ph = (IH * scale) / gh, pw = (IW * scale) / gw;
      for (let r = 0; r < gh; r++)
        for (let c = 0; c < gw; c++) {
          const q = map[r * gw + c];
          if (q === 0) continue;
          ctx.fillStyle = heat(q);
          ctx.fillRect(c * pw, r * ph, pw, ph);
        }
    };
    if (sprites[set].complete && sprites[set].naturalWidth) paint();
    else spriteReady[set].then(paint);
  }

  // ---- state ---------------------------------------------------------------------------------------------------
  const state = { sae: 0, q: "", sort: "id", dir: 1, feature: null, rows: [] };
  const S = () => D.saes[state.sae];
  const pos = (s, f) => {
    if (!s._pos) { s._pos = new Map(); s.live.forEach((id, i) => s._pos.set(id, i)); }
    return s._pos.has(f) ? s._pos.get(f) : -1;
  };

  function columns(s) {
    const cols = [
      { key: "id", name: "id", w: "52px", get: (i) => s.live[i], show: (v) => "#" + v },
      { key: "density", name: "density", w: "100px", get: (i) => s.density[i], show: fmtDensity },
      { key: "mean_act", name: "mean act", w: "72px", get: (i) => meanAct(s, i), show: (v) => fmt(v, 3), title: "mean activation over the clean patch tokens where it fires (– : never fires on a clean token)" },
      { key: "label", name: "label", w: "minmax(100px, 1fr)", get: (i) => labelText(s, i), show: esc, html: (i) => labelHtml(s, i), text: true },
    ];
    if (s.stability) cols.push({ key: "stability", name: "seed stab.", w: "76px", get: (i) => s.stability[i], show: (v) => fmt(v, 2), title: "seed stability: mean decoder cosine to the nearest latent of each other seed replicate" });
    // keyed by the counterpart's model, not its SAE: a sort by "cos <model>" survives a change of replicate
    for (const m of s.matches) cols.push({ key: "match:" + m.model, name: "cos " + m.model, w: "76px", get: (i) => m.cos[i], show: (v) => fmt(v, 2), title: `change under fine-tuning: decoder cosine to the nearest latent of ${m.sae} (model ${m.model})` });
    return cols;
  }

  function refilter() {
    const s = S();
    const q = state.q.trim().toLowerCase();
    const col = columns(s).find((c) => c.key === state.sort) || columns(s)[0];
    let rows = [...s.live.keys()];
    if (q) {
      const idq = q.replace(/^#/, "");
      const num = /^\d+$/.test(idq);
      rows = rows.filter((i) => (num && String(s.live[i]) === idq) || labelText(s, i).toLowerCase().includes(q) || ("#" + s.live[i]) === q);
    }
    const dir = state.dir;
    rows.sort((a, b) => {
      const va = col.get(a), vb = col.get(b);
      if (va === vb) return s.live[a] - s.live[b];
      if (va === null) return 1;
      if (vb === null) return -1;
      return (col.text ? String(va).localeCompare(String(vb), undefined, { numeric: true }) : va - vb) * dir;
    });
    state.rows = rows;
    renderIndex();
  }

  function renderHeader() {
    const s = S();
    const cols = columns(s);
    const tpl = cols.map((c) => c.w).join(" ");
    $("#left").style.setProperty("--cols", tpl);
    $("#thead").innerHTML = cols
      .map((c) => `<div data-sort="${c.key}" title="${esc(c.title || "sort by " + c.name)}" class="${c.key === state.sort ? "sorted" + (state.dir > 0 ? " asc" : "") : ""}">${esc(c.name)}</div>`)
      .join("");
  }

  function renderIndex() {
    const s = S();
    renderHeader();
    const nLive = s.n_live ?? s.live.length;
    $("#count").textContent = nLive > s.live.length
      ? `${state.rows.length} of ${s.live.length} listed latents (the most often firing of ${nLive} live; ${s.d_sae - nLive} dead of ${s.d_sae}) · ${s.name}`
      : `${state.rows.length} of ${s.live.length} live latents (${s.d_sae - s.live.length} dead of ${s.d_sae}) · ${s.name}`;
    $("#spacer").style.height = state.rows.length * ROW + "px";
    renderRows();
  }

  function renderRows() {
    const s = S();
    const cols = columns(s);
    const list = $("#list");
    const first = Math.max(0, Math.floor(list.scrollTop / ROW) - 8);
    const last = Math.min(state.rows.length, Math.ceil((list.scrollTop + list.clientHeight) / ROW) + 8);
    let html = "";
    const maxDen = s._maxDensity || (s._maxDensity = Math.max(s.density[argmax(s.density)], 1e-12));
    for (let r = first; r < last; r++) {
      const i = state.rows[r];
      const f = s.live[i];
      const cells = cols.map((c) => {
        const v = c.get(i);
        if (c.key === "density") return `<div><span class="bar" style="width:${Math.max(1, (30 * Math.sqrt(v / maxDen))).toFixed(1)}px"></span>${c.show(v)}</div>`;
        if (c.text) return `<div title="${esc(v)}">${c.html ? c.html(i) : c.show(v)}</div>`;
        return `<div>${c.show(v)}</div>`;
      });
      const sel = f === state.feature;
      html += `<div class="row${sel ? " sel" : ""}" id="opt-${f}" role="option" aria-selected="${sel}" data-feature="${f}" style="top:${r * ROW}px">${cells.join("")}</div>`;
    }
    $("#spacer").innerHTML = html;
    // the listbox's active option, for assistive technology (when its row is rendered)
    if (state.feature !== null && $("#opt-" + state.feature)) list.setAttribute("aria-activedescendant", "opt-" + state.feature);
    else list.removeAttribute("aria-activedescendant");
  }

  // ---- detail panel --------------------------------------------------------------------------------------------
  function slice(a, start, n) { return a ? a.subarray(start, start + n) : null; }

  function groupOf(img) {
    // the corruption a pooled corrupted image came from (images.corrupted_groups: [[name, count], ...])
    let start = 0;
    for (const [name, count] of D.images.corrupted_groups || []) {
      if (img < start + count) return name;
      start += count;
    }
    return "";
  }

  function topFigures(s, i, set, scale) {
    // figures of the i-th listed latent's top images of one set (clean, corrupted), each with its heatmap; a
    // corrupted image's caption names the condition it came from
    const k = s.k, P = s.grid[0] * s.grid[1];
    const top = set === "clean" ? s.top[i] : s.top_c[i];
    const vals = set === "clean" ? s.top_val[i] : s.top_val_c[i];
    const maps = arr(s, set === "clean" ? "maps" : "maps_c");
    const labels = setLabels(set);
    const out = [];
    for (let j = 0; j < k; j++) {
      if (top[j] < 0) continue;
      const fig = document.createElement("figure");
      fig.className = "topimg";
      fig.dataset.set = set;
      fig.dataset.image = top[j];
      fig.dataset.value = vals[j];
      const cv = document.createElement("canvas");
      cv.width = IW * scale; cv.height = IH * scale;
      fig.appendChild(cv);
      const cap = document.createElement("figcaption");
      const grp = set === "clean" ? "" : groupOf(top[j]);
      if (grp) fig.dataset.group = grp;
      cap.innerHTML = `${esc(D.class_names[labels[top[j]]])}${grp ? `<br><span class="cond">${esc(grp)}</span>` : ""}<br>max ${fmt(vals[j], 2)}`;
      fig.appendChild(cap);
      drawImageOf(s, cv, set, top[j], slice(maps, (i * k + j) * P, P), scale);
      out.push(fig);
    }
    return out;
  }

  function bars(values, opts) {
    // horizontal bar chart as inline SVG: one bar per class
    const w = opts.width || 260, rowh = 14, lw = 78, n = values.length;
    const max = Math.max(...values.map(Math.abs), 1e-12);
    const signed = values.some((v) => v < 0);
    const zero = signed ? lw + (w - lw - 40) / 2 : lw;
    const span = signed ? (w - lw - 40) / 2 : w - lw - 40;
    let g = "";
    values.forEach((v, c) => {
      const len = (Math.abs(v) / max) * span;
      const x = v < 0 ? zero - len : zero;
      const col = opts.color ? opts.color(v) : v < 0 ? "#6d8fc7" : "#d0674f";
      g += `<text x="${lw - 4}" y="${c * rowh + 10}" text-anchor="end">${esc(D.class_names[c])}</text>`;
      g += `<rect x="${x.toFixed(1)}" y="${c * rowh + 2}" width="${Math.max(len, 0.5).toFixed(1)}" height="${rowh - 4}" fill="${col}"></rect>`;
      g += `<text x="${(v < 0 ? zero + 3 : zero + len + 3).toFixed(1)}" y="${c * rowh + 10}">${opts.show(v)}</text>`;
    });
    if (signed) g += `<line x1="${zero}" x2="${zero}" y1="0" y2="${n * rowh}" stroke="#888"></line>`;
    return `<svg width="${w}" height="${n * rowh + 4}" class="${opts.cls || ""}">${g}</svg>`;
  }

  function histogram(s, i) {
    const h = s.hist[i], n = h.length, w = 260, hh = 90;
    const max = Math.max(...h, 1);
    const bw = (w - 10) / n;
    let g = "";
    h.forEach((c, b) => {
      const y = c > 0 ? (Math.log10(c + 1) / Math.log10(max + 1)) * hh : 0;
      g += `<rect x="${(5 + b * bw).toFixed(1)}" y="${(hh - y).toFixed(1)}" width="${(bw - 1).toFixed(1)}" height="${y.toFixed(1)}" fill="#6d8fc7"><title>${fmt((b * s.max_act[i]) / n, 3)}–${fmt(((b + 1) * s.max_act[i]) / n, 3)}: ${c} tokens</title></rect>`;
    });
    g += `<text x="5" y="${hh + 12}">0</text><text x="${w - 5}" y="${hh + 12}" text-anchor="end">${fmt(s.max_act[i], 3)}</text>`;
    if (!sum(h)) return `<div class="muted" id="hist">none: never active on the clean images (the histogram counts clean patch tokens)</div>`;
    return `<svg width="${w}" height="${hh + 16}" id="hist">${g}</svg><div class="muted">non-zero activations on clean patch tokens (log count)</div>`;
  }

  function noImages(s, i, set) {
    // why a latent has no top images in a set
    if (set === "clean" && hasImages(s, i, "corrupted")) return `never active on the clean images (its top ${esc(CORR)} images are below)`;
    if (set === "clean") return "never active on the clean images";
    return `never active on the ${esc(CORR)} images`;
  }

  function imageRows(s, i) {
    // the latent's top clean images and, below, its top corrupted images (each captioned with its condition)
    const sets = D.images.corrupted && s.top_c ? ["clean", "corrupted"] : ["clean"];
    return sets.map((set) => `<div class="imgrow" data-set="${set}"><div class="rowhead"${set === "clean" ? "" : ` title="${esc(CORR)}"`}>${set}</div>` +
      `<div class="imgs" id="${set === "clean" ? "topimgs" : "topimgs-c"}"></div></div>`).join("");
  }

  function logitPanel(s, i) {
    // the direct logit effect, saying which mean activation it is computed at when not the clean one
    const basis = basisOf(s, i);
    const row = basis === "none" ? null : logitRow(s, i);
    if (!row || row.some((v) => Number.isNaN(v))) {
      return `<div id="logit-effect" data-basis="none"><h3>Direct logit effect</h3><div class="muted" id="logit-note">not measured (never fires on clean images)</div></div>`;
    }
    const at = basis === "corrupted"
      ? `its mean activation on the ${esc(CORR)} tokens where it fires (${fmt(s.mean_act_c ? s.mean_act_c[i] : null, 3)}; it never fires on the clean images)`
      : "mean act";
    return `<div id="logit-effect" data-basis="${basis}"><h3>Direct logit effect${basis === "corrupted" ? ` <span class="basis">at the ${esc(CORR)} mean activation</span>` : ""}</h3>` +
      `${bars(row, { show: (v) => fmtSigned(v, 2), cls: "logits" })}` +
      `<div class="muted" id="logit-note" style="max-width:300px">Δ logit when ${at} × decoder direction is added to the readout token(s) of the final residual stream (model's own final norm, pooling, head; blocks after the hook skipped).</div></div>`;
  }

  function classesPanel(s, i) {
    // the classes of the top images the latent fires on: min(n_assoc, the clean images it fires on); for a latent
    // that fires only on corrupted images, of its top corrupted images (labelSetOf), the images its label comes from
    const n = sum(s.class_counts[i]);
    if (n === 0) return `<div id="classes"><h3>Classes of top images</h3><div class="muted">none: never active on the clean images</div></div>`;
    const corr = labelSetOf(s, i) === "corrupted";
    const head = `Classes of top ${n}${corr ? " corrupted" : ""} image${n === 1 ? "" : "s"}`;
    const note = corr ? `<div class="muted" id="classes-note">its top ${esc(CORR)} images: it never fires on a clean image</div>` : "";
    return `<div id="classes" data-n="${n}" data-set="${corr ? "corrupted" : "clean"}"><h3>${head}</h3>${bars(s.class_counts[i], { show: (v) => String(v), color: () => "#7a9c5a", cls: "classes" })}${note}</div>`;
  }

  function ablationTable(s, i) {
    // before / ablated / doubled on the top images of the set the effect was measured on (ablationSetOf)
    const set = ablationSetOf(s, i);
    if (set === "none") {
      const fires = hasImages(s, i, "clean") || hasImages(s, i, "corrupted");
      const why = !s.ablation_set && fires
        ? "this page (before mechvit-explorer/5) measured it on clean top images only, and the latent never fires on a clean image"
        : fires ? "its effects were not computed" : "the latent never fires on these images";
      return `<p class="muted" id="ablation" data-set="none">not measured (${why})</p>`;
    }
    const k = s.k;
    const pa = probs(s, "p_abl"), pd = probs(s, "p_dbl");
    const model = D.models[s.model];
    const before = set === "clean" ? probs(model, "probs") : model.probs_c ? probs(model, "probs_c") : null;
    const top = set === "clean" ? s.top[i] : s.top_c[i];
    const labels = setLabels(set);
    const pct = (p) => `${fmtFixed(p, 1, 100)}%`;
    let rows = "";
    for (let j = 0; j < k; j++) {
      const img = top[j];
      if (img < 0) continue;
      const a = Array.from(pa.subarray((i * k + j) * C, (i * k + j) * C + C));
      const d = Array.from(pd.subarray((i * k + j) * C, (i * k + j) * C + C));
      const grp = set === "clean" ? "" : groupOf(img);
      const b = before ? Array.from(before.subarray(img * C, img * C + C)) : null;
      // the class the model predicts before (else, without "before" probabilities, the top class ablated)
      const pred = b ? b.indexOf(Math.max(...b)) : a.indexOf(Math.max(...a));
      const cell = (p) => {
        const top1 = p.indexOf(Math.max(...p));
        if (!b) return `<td data-pred="${top1}" data-p="${p[pred].toFixed(5)}">${esc(D.class_names[top1])} ${pct(p[top1])}<br><span>p(${esc(D.class_names[pred])}) ${pct(p[pred])}</span></td>`;
        const dp = p[pred] - b[pred];
        const cls = Math.abs(dp) < 0.005 ? "" : dp > 0 ? "up" : "down";
        const mag = fmtFixed(Math.abs(dp), clean(Math.abs(dp)) < 0.01 ? 2 : 1, 100);
        const delta = `${dp < 0 && /[1-9]/.test(mag) ? "−" : "+"}${mag}`;
        return `<td data-pred="${top1}" data-p="${p[pred].toFixed(5)}">${esc(D.class_names[top1])} ${pct(p[top1])}<br><span class="${cls}" title="change of p(${esc(D.class_names[pred])}) in percentage points">p(${esc(D.class_names[pred])}) ${pct(p[pred])} (${delta})</span></td>`;
      };
      const beforeCell = b
        ? `<td data-pred="${pred}" data-p="${b[pred].toFixed(5)}">${esc(D.class_names[pred])} ${pct(b[pred])}</td>`
        : `<td class="muted" data-pred="" data-p="">not measured</td>`;
      rows += `<tr data-image="${img}" data-j="${j}" data-set="${set}"><td><canvas width="${IW * 2}" height="${IH * 2}" data-thumb="${img}" data-set="${set}"></canvas>${grp ? `<div class="cond">${esc(grp)}</div>` : ""}</td><td>${esc(D.class_names[labels[img]])}</td>` +
        `${beforeCell}${cell(a)}${cell(d)}</tr>`;
    }
    return `<table class="abl" id="ablation" data-set="${set}"><tr><th>image</th><th>true</th><th>before</th><th>ablated (×0)</th><th>doubled (×2)</th></tr>${rows}</table>`;
  }

  function ablationHead(s, i) {
    // the heading and note of the ablation panel: which images the effect was measured on
    const set = ablationSetOf(s, i);
    const what = `the latent's decoded contribution at every patch token of ${esc(s.hook)} removed (×0) or added again (×2), SAE error kept: "before" is the model's own prediction`;
    if (set === "corrupted") {
      return `<h3>Ablate / double on the top ${esc(CORR)} images <span class="basis">(it never fires on a clean image)</span></h3>` +
        `<div class="muted" id="ablation-note">each corrupted image through the model, ${what} on that corrupted image.</div>`;
    }
    if (set === "clean") return `<h3>Ablate / double on the top clean images</h3><div class="muted" id="ablation-note">${what}.</div>`;
    return `<h3>Ablate / double</h3>`;
  }

  function notListed(s) {
    return (s.n_live ?? s.live.length) > s.live.length
      ? `not listed (never active on these images, or not among the ${s.live.length} latents listed)`
      : "never active on these images";
  }

  function matchBlock(s, i, m) {
    const other = D.saes.find((x) => x.name === m.sae);
    const g = m.idx[i];
    const gi = pos(other, g);
    const div = document.createElement("div");
    div.className = "match";
    div.dataset.sae = m.sae;
    div.dataset.feature = g;
    div.dataset.cos = m.cos[i];
    const live = gi >= 0;
    div.innerHTML = `<div class="head"><b>${esc(other.name)}</b> (model ${esc(other.model)}) · nearest latent <a class="open" data-open-sae="${esc(other.name)}" data-open-feature="${g}">#${g}</a> · decoder cosine <b>${fmt(m.cos[i], 3)}</b>` +
      (live ? ` · ${labelHtml(other, gi)} · density ${fmtDensity(other.density[gi])}` : ` · <span class="muted">${notListed(other)}</span>`) + `</div>`;
    if (live) {
      const imgs = document.createElement("div");
      imgs.className = "imgs";
      // its top clean images; its top corrupted images (captioned with their condition) when it has no clean one
      const set = !hasImages(other, gi, "clean") && hasImages(other, gi, "corrupted") ? "corrupted" : "clean";
      imgs.dataset.set = set;
      topFigures(other, gi, set, 2).forEach((f) => imgs.appendChild(f));
      div.appendChild(imgs);
    }
    return div;
  }

  function renderDetail() {
    const s = S();
    const el = $("#detail");
    const f = state.feature;
    const i = f === null ? -1 : pos(s, f);
    if (i < 0) {
      el.dataset.sae = s.name;
      el.dataset.feature = f === null ? "" : f;
      el.innerHTML = f === null
        ? `<p class="muted">Pick a latent on the left (search by id or label; click a column to sort).</p>`
        : (s.n_live ?? s.live.length) > s.live.length
          ? `<h2>${esc(s.name)} · latent #${f}</h2><p class="muted">This latent is not listed: it never fires on these images, or it is not among the ${s.live.length} most often firing latents the page lists (max_latents).</p>`
          : `<h2>${esc(s.name)} · latent #${f}</h2><p class="muted">This latent never fires on these images (dead here): nothing to show.</p>`;
      return;
    }
    el.dataset.sae = s.name;
    el.dataset.feature = f;
    // data-value: the number (NaN where there is none, e.g. the mean activation of a latent that never fires)
    const stat = (key, name, v, shown) => `<div class="stat" data-key="${key}" data-value="${v === null || v === undefined ? NaN : v}"><b>${name}</b><span>${shown}</span></div>`;
    let statsHtml = stat("density", "density (clean)", s.density[i], fmtDensity(s.density[i]));
    if (s.density_c) statsHtml += stat("density_corrupted", `density (${esc(CORR)})`, s.density_c[i], fmtDensity(s.density_c[i]));
    statsHtml += stat("mean_act", s.mean_act_c ? "mean activation (clean)" : "mean activation", meanAct(s, i), fmt(meanAct(s, i), 3));
    if (s.mean_act_c) statsHtml += stat("mean_act_corrupted", `mean activation (${esc(CORR)})`, s.mean_act_c[i], fmt(s.mean_act_c[i], 3));
    statsHtml += stat("max_act", "max activation", s.max_act[i], fmt(s.max_act[i], 3));
    if (s.stability) statsHtml += stat("stability", "seed stability", s.stability[i], fmt(s.stability[i], 3));
    const card = s.cards && s.cards[f];
    // every latent: a card drawn here from the page's data (SVG, or PNG at print resolution); the study's
    // densest latents also have the card mechvit.viz.feature_card wrote (matplotlib, PNG + SVG) beside the page
    const cardHtml = `<span class="cardbtns">feature card <button id="card-svg-btn" data-card="svg">SVG</button>` +
      `<button id="card-png-btn" data-card="png" title="${CARD_DPI} dpi">PNG ${CARD_DPI} dpi</button></span>` +
      (card
        ? ` · written by <code>mechvit.viz.feature_card</code>: <a href="${esc(card.png)}" id="card-png">PNG</a> · <a href="${esc(card.svg)}" id="card-svg">SVG</a>`
        : ` <span class="muted">(or <code>mechvit.viz.feature_card(stats, ${f}, images, class_names, path="card.png")</code>)</span>`);
    el.innerHTML = `<h2>${esc(s.name)} · latent #${f}</h2><div class="label" id="label" data-set="${labelSetOf(s, i)}">${labelHtml(s, i)}</div>` +
      `<div class="stats">${statsHtml}</div><div>${cardHtml}</div>` +
      `<h3>Top images</h3>${imageRows(s, i)}` +
      `<div class="muted">heatmap: the latent's activation on each patch (scale 0 – ${fmt(s.max_act[i], 3)}, the latent's max) ` +
      `<canvas class="cbar" width="120" height="8" id="cbar"></canvas></div>` +
      `<div class="panel"><div><h3>Activation histogram</h3>${histogram(s, i)}</div>` +
      classesPanel(s, i) + logitPanel(s, i) + `</div>` +
      ablationHead(s, i) + ablationTable(s, i) +
      `<div id="matches"></div>`;
    const cb = $("#cbar").getContext("2d");
    for (let x = 0; x < 120; x++) { cb.fillStyle = "#ddd"; cb.fillRect(x, 0, 1, 8); cb.fillStyle = heat(Math.round((x / 119) * 255)); cb.fillRect(x, 0, 1, 8); }
    for (const row of el.querySelectorAll(".imgrow")) {
      const set = row.dataset.set, box = row.querySelector(".imgs");
      topFigures(s, i, set, 3).forEach((fig) => box.appendChild(fig));
      if (!box.children.length) box.innerHTML = `<span class="muted noimgs" id="${set === "clean" ? "noimgs" : "noimgs-c"}">${noImages(s, i, set)}</span>`;
    }
    el.querySelectorAll("canvas[data-thumb]").forEach((cv) => drawImage(cv, cv.dataset.set, +cv.dataset.thumb, null, 2));
    const mbox = $("#matches");
    if (s.matches.length || (s.replicates && s.replicates.length)) mbox.innerHTML = `<h3>Matched latents in other SAEs</h3>`;
    for (const m of s.matches) mbox.appendChild(matchBlock(s, i, m));
    for (const m of s.replicates || []) mbox.appendChild(matchBlock(s, i, m));
  }

  // ---- feature card export (client side, no network) ----------------------------------------------------------
  const CARD_W = 720; // CSS px: 7.5 in at 96 px/in
  const CARD_DPI = 300;

  async function cardSvg(saeName, f) {
    // a standalone SVG card of latent f: title, label, numbers, its top clean images with heatmaps (its top
    // corrupted images, captioned with their condition, when it never fires on a clean image), classes, logits
    const s = D.saes.find((x) => x.name === saeName);
    const i = s ? pos(s, f) : -1;
    if (i < 0) throw new Error(`no live latent #${f} in ${saeName}`);
    const set = !hasImages(s, i, "clean") && hasImages(s, i, "corrupted") ? "corrupted" : "clean";
    if (spriteReady[set]) await spriteReady[set];
    // up to 6 images, their cells sized from the card's width so the row always fits inside its margins
    const x0 = 16, n = Math.min(6, s.k), gap = 8;
    const cell = Math.min(112, Math.floor((CARD_W - 2 * x0 - (n - 1) * gap) / n));
    const figs = [];
    const k = s.k, P = s.grid[0] * s.grid[1];
    const maps = arr(s, set === "clean" ? "maps" : "maps_c");
    const top = set === "clean" ? s.top[i] : s.top_c[i], vals = set === "clean" ? s.top_val[i] : s.top_val_c[i];
    for (let j = 0; j < n; j++) {
      const img = top[j];
      if (img < 0) continue;
      const cv = document.createElement("canvas");
      cv.width = IW * 4; cv.height = IH * 4;
      drawImageOf(s, cv, set, img, slice(maps, (i * k + j) * P, P), 4);
      figs.push({ uri: cv.toDataURL("image/png"), img, v: vals[j], grp: set === "clean" ? "" : groupOf(img) });
    }
    let g = `<text x="${x0}" y="24" class="t">${esc(s.name)} · latent #${f}</text>` +
      `<text x="${x0}" y="44" class="l">${esc(labelText(s, i))}</text>` +
      `<text x="${x0}" y="62">density ${fmtDensity(s.density[i])} · mean act ${fmt(meanAct(s, i), 3)}` +
      (s.mean_act_c && basisOf(s, i) === "corrupted" ? ` (${esc(CORR)}: ${fmt(s.mean_act_c[i], 3)})` : "") + ` · max ${fmt(s.max_act[i], 3)}` +
      (s.stability ? ` · seed stability ${fmt(s.stability[i], 2)}` : "") + ` · hook ${esc(s.hook)}</text>`;
    const labels = setLabels(set);
    figs.forEach((fg, j) => {
      const x = x0 + j * (cell + gap);
      g += `<image x="${x}" y="74" width="${cell}" height="${cell}" href="${fg.uri}" style="image-rendering:pixelated"></image>` +
        `<text x="${x + cell / 2}" y="${74 + cell + 12}" text-anchor="middle">${esc(D.class_names[labels[fg.img]])} · ${fmt(fg.v, 2)}</text>` +
        (fg.grp ? `<text x="${x + cell / 2}" y="${74 + cell + 24}" text-anchor="middle" class="cond">${esc(fg.grp)}</text>` : "");
    });
    if (!figs.length) g += `<text x="${x0}" y="${74 + 20}">never active on these images</text>`;
    let y1 = 74 + cell + 30;
    if (set === "corrupted" && figs.length) {
      // which images these are: the corrupted ones, as it never fires on a clean image
      g += `<text x="${x0}" y="${74 + cell + 40}" class="basis">top ${esc(CORR)} images: never active on the clean images</text>`;
      y1 += 26;
    }
    const nCls = sum(s.class_counts[i]), basis = basisOf(s, i);
    const clsOf = labelSetOf(s, i) === "corrupted" ? " corrupted" : "";
    const row = basis === "none" ? null : logitRow(s, i);
    const measured = row && !row.some((v) => Number.isNaN(v));
    g += `<text x="${x0}" y="${y1}" class="h">${nCls ? `classes of the top ${nCls}${clsOf} image${nCls === 1 ? "" : "s"}` : "classes of the top images"}</text>` +
      (nCls ? `<g transform="translate(${x0},${y1 + 6})">${bars(s.class_counts[i], { width: 320, show: (v) => String(v), color: () => "#7a9c5a" })}</g>` : `<text x="${x0}" y="${y1 + 18}">none: never active on the clean images</text>`) +
      `<text x="${x0 + 350}" y="${y1}" class="h">direct logit effect${measured && basis === "corrupted" ? " (at the corrupted mean act*)" : ""}</text>` +
      (measured
        ? `<g transform="translate(${x0 + 350},${y1 + 6})">${bars(row, { width: 340, show: (v) => fmtSigned(v, 2) })}</g>`
        : `<text x="${x0 + 350}" y="${y1 + 18}" class="basis">not measured (never fires on clean images)</text>`);
    let h = y1 + 6 + C * 14 + 16;
    if (measured && basis === "corrupted") {
      g += `<text x="${x0}" y="${h}" class="basis">* at its mean activation on the ${esc(CORR)} images (${fmt(s.mean_act_c ? s.mean_act_c[i] : null, 3)}); it never fires on clean images</text>`;
      h += 14;
    }
    return `<svg xmlns="http://www.w3.org/2000/svg" width="${CARD_W}" height="${h}" viewBox="0 0 ${CARD_W} ${h}">` +
      `<style>text{font:10px sans-serif;fill:#3b4558}.t{font-size:15px;font-weight:600;fill:#1d2430}.l{font-size:13px}.h{font-size:11px;font-weight:600}.basis{font-style:italic}.cond{font-size:9px;fill:#6a7588}</style>` +
      `<rect width="100%" height="100%" fill="#fff"></rect>${g}</svg>`;
  }

  function cardPng(svg, dpi) {
    // the SVG rasterised at dpi (the card is 7.5 in wide): resolves to a PNG data URL
    const scale = (dpi || CARD_DPI) / 96;
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => {
        const cv = document.createElement("canvas");
        cv.width = Math.round(img.naturalWidth * scale);
        cv.height = Math.round(img.naturalHeight * scale);
        const ctx = cv.getContext("2d");
        ctx.drawImage(img, 0, 0, cv.width, cv.height);
        resolve(cv.toDataURL("image/png"));
      };
      img.onerror = () => reject(new Error("the card SVG did not render"));
      img.src = URL.createObjectURL(new Blob([svg], { type: "image/svg+xml" }));
    });
  }

  function download(href, name) {
    const a = document.createElement("a");
    a.href = href;
    a.download = name;
    document.body.appendChild(a);
    a.click();
    a.remove();
  }

  async function exportCard(kind) {
    const s = S(), f = state.feature;
    const svg = await cardSvg(s.name, f);
    const stem = `${s.name.replace(/[^A-Za-z0-9_.-]+/g, "_")}_latent_${f}`;
    if (kind === "svg") download(URL.createObjectURL(new Blob([svg], { type: "image/svg+xml" })), stem + ".svg");
    else download(await cardPng(svg, CARD_DPI), stem + ".png");
  }

  // ---- navigation ----------------------------------------------------------------------------------------------
  function selectSae(idx, keepFeature) {
    state.sae = idx;
    document.querySelectorAll("#saes button").forEach((b, j) => b.classList.toggle("on", j === idx));
    if (!keepFeature) state.feature = null;
    const cols = columns(S());
    if (!cols.find((c) => c.key === state.sort)) { state.sort = "id"; state.dir = 1; }
    refilter();
    renderDetail();
  }
  function scrollToRow(r, nearest) {
    // bring row r of the (virtualised) index into view: just enough (nearest, keyboard), or to a third from the top
    const list = $("#list");
    const top = r * ROW, bottom = top + ROW;
    if (r < 0 || (top >= list.scrollTop && bottom <= list.scrollTop + list.clientHeight)) return;
    list.scrollTop = !nearest ? top - list.clientHeight / 3 : top < list.scrollTop ? top : bottom - list.clientHeight;
    renderRows();
  }

  function open(saeName, f, nearest) {
    const idx = D.saes.findIndex((x) => x.name === saeName);
    if (idx < 0) return;
    state.feature = f;
    if (idx !== state.sae) selectSae(idx, true);
    else { renderRows(); renderDetail(); }
    history.replaceState(null, "", "#" + new URLSearchParams({ sae: saeName, f: String(f) }).toString());
    scrollToRow(state.rows.findIndex((i) => S().live[i] === f), nearest);
  }

  function openDensest() {
    // the densest listed latent of the current SAE, so the panel never starts empty
    if (S().live.length) open(S().name, S().live[argmax(S().density)]);
  }

  function notice(msg) {
    // a message above the panel (e.g. a link that cannot be followed), until the next latent is opened
    const old = $("#notice");
    if (old) old.remove();
    const p = document.createElement("p");
    p.id = "notice";
    p.className = "notice";
    p.setAttribute("role", "alert");
    p.textContent = msg;
    $("#detail").prepend(p);
  }

  function fromHash(initial) {
    // open what a link's #sae=NAME&f=LATENT names: on load, and whenever the hash changes in an open page
    const h = new URLSearchParams(location.hash.slice(1));
    const name = h.get("sae"), fs = h.get("f");
    let idx = name === null ? state.sae : D.saes.findIndex((x) => x.name === name);
    const problems = [];
    if (idx < 0) { problems.push(`this page has no SAE named “${name}”`); idx = state.sae; }
    const f = fs !== null && /^\s*\d+\s*$/.test(fs) ? parseInt(fs, 10) : null;
    if (fs !== null && f === null) problems.push(`“${fs}” is not a latent number`);
    if (initial) {
      // a page opened from a link always shows something: the SAE it names (else the first) and its latent
      selectSae(idx);
      if (f !== null) open(S().name, f);
      else openDensest();
    } else if (!problems.length) {
      if (f !== null) open(D.saes[idx].name, f);
      else if (idx !== state.sae) { selectSae(idx); openDensest(); }
    }
    if (problems.length) {
      const at = state.feature === null ? S().name : `${S().name} · latent #${state.feature}`;
      notice(`Could not follow the link: ${problems.join("; ")} (links read #sae=NAME&f=LATENT, LATENT a whole number); ${initial ? "showing" : "still showing"} ${at}.`);
    }
  }

  function moveSelection(key) {
    // keyboard navigation of the index (a listbox): the selection moves and its latent opens
    const n = state.rows.length;
    if (!n) return false;
    const cur = state.rows.findIndex((i) => S().live[i] === state.feature);
    const page = Math.max(1, Math.floor($("#list").clientHeight / ROW) - 1);
    const moves = {
      ArrowDown: cur + 1, ArrowUp: cur - 1, PageDown: cur + page, PageUp: cur - page, Home: 0, End: n - 1, Enter: cur, " ": cur,
    };
    if (!(key in moves)) return false;
    const r = cur < 0 && key !== "End" ? 0 : Math.min(n - 1, Math.max(0, moves[key]));
    open(S().name, S().live[state.rows[r]], true);
    return true;
  }

  function init() {
    $("#title").textContent = D.title;
    $("#meta").textContent = `${D.images.n} images${D.images.corrupted ? " + " + D.images.n_corrupted + " " + D.images.corrupted_name : ""} · ${D.saes.length} SAE${D.saes.length > 1 ? "s" : ""}`;
    $("#saes").innerHTML = D.saes.map((s, j) => `<button data-i="${j}" title="model ${esc(s.model)} · ${esc(s.hook)}">${esc(s.name)}</button>`).join("");
    $("#saes").addEventListener("click", (e) => { const b = e.target.closest("button"); if (b) selectSae(+b.dataset.i); });
    $("#search").addEventListener("input", (e) => { state.q = e.target.value; $("#list").scrollTop = 0; refilter(); });
    $("#search").addEventListener("keydown", (e) => {
      // ArrowDown / Enter: on to the index (Enter also opens the first match when the open latent is not listed)
      if (e.key !== "ArrowDown" && e.key !== "Enter") return;
      e.preventDefault();
      $("#list").focus();
      if (!state.rows.some((i) => S().live[i] === state.feature)) moveSelection("Home");
    });
    $("#list").addEventListener("keydown", (e) => {
      if (e.altKey || e.ctrlKey || e.metaKey) return;
      if (moveSelection(e.key)) e.preventDefault();
    });
    $("#thead").addEventListener("click", (e) => {
      const h = e.target.closest("[data-sort]");
      if (!h) return;
      if (state.sort === h.dataset.sort) state.dir = -state.dir;
      else { state.sort = h.dataset.sort; state.dir = h.dataset.sort === "id" || h.dataset.sort === "label" ? 1 : -1; }
      refilter();
    });
    let pending = false;
    $("#list").addEventListener("scroll", () => { if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; renderRows(); }); } });
    $("#spacer").addEventListener("click", (e) => { const r = e.target.closest(".row"); if (r) open(S().name, +r.dataset.feature); });
    $("#detail").addEventListener("click", (e) => {
      const a = e.target.closest("[data-open-sae]");
      if (a) { open(a.dataset.openSae, +a.dataset.openFeature); return; }
      const c = e.target.closest("button[data-card]");
      if (c) exportCard(c.dataset.card).catch((err) => console.error(err));
    });
    window.addEventListener("resize", renderRows);
    window.addEventListener("hashchange", () => fromHash(false));
    fromHash(true);
    document.body.dataset.ready = "1";
    // load time, as the browser measures it: index and first latent rendered (readyMs), images painted (paintedMs)
    Object.assign(window.explorer, { scriptMs: T0, parsedMs: T1, readyMs: performance.now() });
    Promise.all(Object.values(spriteReady)).then(() => {
      requestAnimationFrame(() => { window.explorer.paintedMs = performance.now(); document.body.dataset.painted = "1"; });
    });
  }

  // for tests and the console: the current filtered, sorted feature ids and a way to open one
  window.explorer = {
    data: D, state, open, cardSvg, cardPng, fmtDensity, fmtFixed, fmtSig,
    visibleIds: () => state.rows.map((i) => S().live[i]),
    renderedRows: () => document.querySelectorAll("#spacer .row").length,
  };
  init();
})();
