"""``GET /``: one self-contained page (no external resources) to try an adapter on an image (a video file for a video
adapter): classes and scores (classification, zero-shot, video), a coloured mask (segmentation), the boxes drawn over
the image with their class and score (detection). A server started with a token takes it in the page's token field:
every request of the page sends it as ``Authorization: Bearer``; the page itself holds no data."""

from __future__ import annotations

__all__ = ["PAGE"]

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vpeft serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:#222}
form{display:flex;gap:.6rem;flex-wrap:wrap;align-items:center;margin:1rem 0}
table{border-collapse:collapse;margin-top:1rem}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
#error{color:#b00020}#mask{image-rendering:pixelated;max-width:100%;margin-top:1rem}small{color:#666}
#boxes{max-width:100%;margin-top:1rem;border:1px solid #ccc}#boxes text{paint-order:stroke;stroke:#fff}
</style></head><body>
<h1>vpeft serve</h1>
<p id="backbone"><small>loading adapters&hellip;</small></p>
<p><label>token <input id="token" type="password" autocomplete="off" placeholder="if the server needs one"></label></p>
<form id="form">
  <label>adapter <select id="adapter" name="adapter" required></select></label>
  <label id="image_input">image <input id="image" name="image" type="file" accept="image/*" required></label>
  <label id="video_input" hidden>video <input id="video" name="video" type="file" accept="video/*" disabled></label>
  <label>top k <input id="top_k" name="top_k" type="number" min="1" value="5" style="width:4rem"></label>
  <button id="go" type="submit">predict</button>
</form>
<p id="error" role="alert"></p>
<div id="answer"></div>
<canvas id="mask" hidden></canvas>
<svg id="boxes" hidden></svg>
<script>
const $ = id => document.getElementById(id);
const PALETTE = [[230,25,75],[60,180,75],[255,225,25],[0,130,200],[245,130,48],[145,30,180],[70,240,240],
  [240,50,230],[210,245,60],[250,190,212],[0,128,128],[220,190,255],[170,110,40],[255,250,200],[128,0,0]];
function text(tag, value) { const e = document.createElement(tag); e.textContent = value; return e; }
function table(head, rows) {
  const t = document.createElement('table'), tr = t.insertRow();
  head.forEach(h => tr.appendChild(text('th', h)));
  rows.forEach(r => { const row = t.insertRow(); r.forEach(v => row.appendChild(text('td', v))); });
  return t;
}
const KINDS = {};
function inputFor() {  // a video adapter takes a video file, every other kind an image (disabled: not sent)
  const video = KINDS[$('adapter').value] === 'video';
  $('video_input').hidden = !video; $('video').disabled = !video; $('video').required = video;
  $('image_input').hidden = video; $('image').disabled = video; $('image').required = !video;
}
function auth() {  // the token typed into the page (not part of the form), sent with every request
  const token = $('token').value.trim();
  return token ? {Authorization: `Bearer ${token}`} : {};
}
async function adapters() {
  const res = await fetch('/v1/adapters', {headers: auth()}), data = await res.json(), select = $('adapter');
  if (!res.ok) { $('error').textContent = `${res.status}: ${data.error}`; return; }
  $('error').textContent = '';
  $('backbone').textContent = `backbone ${data.backbone}, input ${(data.input_size || []).join('x')}`;
  select.replaceChildren();
  data.adapters.forEach(a => {
    const o = text('option', a.refused ? `${a.id} (refused)` : `${a.id} (${a.kind}, ${a.method})`);
    o.value = a.id; o.disabled = !!a.refused; select.appendChild(o); KINDS[a.id] = a.kind;
  });
  inputFor();
}
function svg(tag, attrs, value) {
  const e = document.createElementNS($('boxes').namespaceURI, tag);  // the SVG namespace
  Object.entries(attrs).forEach(([k, v]) => e.setAttribute(k, v));
  if (value !== undefined) e.textContent = value;
  return e;
}
function drawBoxes(answer, file) {  // the uploaded image with every detection's box, class and score over it
  const s = $('boxes'), w = answer.width, h = answer.height, zoom = Math.max(1, 480 / Math.max(w, h));
  const font = Math.max(w, h) / 24;
  s.replaceChildren(); s.setAttribute('viewBox', `0 0 ${w} ${h}`);
  s.setAttribute('width', Math.round(w * zoom)); s.setAttribute('height', Math.round(h * zoom));
  s.appendChild(svg('image', {href: URL.createObjectURL(file), x: 0, y: 0, width: w, height: h,
                              preserveAspectRatio: 'none'}));
  answer.detections.forEach((d, i) => {
    const [x1, y1, x2, y2] = d.box, col = `rgb(${PALETTE[d.index % PALETTE.length].join(',')})`;
    const g = svg('g', {class: 'box'});
    g.appendChild(svg('rect', {x: x1, y: y1, width: Math.max(x2 - x1, 0), height: Math.max(y2 - y1, 0),
                               fill: 'none', stroke: col, 'stroke-width': font / 5}));
    g.appendChild(svg('text', {x: x1, y: Math.max(y1 - font / 4, font), fill: col, 'font-size': font,
                               'stroke-width': font / 8}, `${d.label ?? d.index} ${d.score.toFixed(2)}`));
    s.appendChild(g);
  });
  s.hidden = false;
}
function drawMask(answer) {
  const img = new Image();
  img.onload = () => {
    const c = $('mask'), ctx = c.getContext('2d');
    c.width = img.width; c.height = img.height; ctx.drawImage(img, 0, 0);
    const px = ctx.getImageData(0, 0, c.width, c.height);
    for (let i = 0; i < px.data.length; i += 4) {
      const col = PALETTE[px.data[i] % PALETTE.length];
      px.data[i] = col[0]; px.data[i + 1] = col[1]; px.data[i + 2] = col[2]; px.data[i + 3] = 255;
    }
    ctx.putImageData(px, 0, 0); c.hidden = false; c.dataset.ready = '1';
  };
  img.src = 'data:image/png;base64,' + answer.mask_png;
}
$('form').addEventListener('submit', async ev => {
  ev.preventDefault();
  $('error').textContent = ''; $('answer').replaceChildren(); $('mask').hidden = true; $('boxes').hidden = true;
  const res = await fetch('/v1/predict', {method: 'POST', body: new FormData($('form')), headers: auth()});
  const data = await res.json();
  if (!res.ok) { $('error').textContent = `${res.status}: ${data.error}`; return; }
  const out = $('answer');
  out.appendChild(text('p', `${data.adapter} (${data.kind}) in ${data.latency_ms} ms`));
  if (data.predictions) {
    out.appendChild(table(['class', 'score'], data.predictions.map(p => [p.label ?? p.index, p.score.toFixed(4)])));
  } else if (data.mask_png) {
    out.appendChild(table(['class', 'pixels'],
      data.present.map(p => [p.label ?? p.index, (100 * p.fraction).toFixed(1) + '%'])));
    drawMask(data);
  } else if (data.detections) {
    out.appendChild(table(['class', 'score', 'box (x1, y1, x2, y2)'], data.detections.map(
      d => [d.label ?? d.index, d.score.toFixed(4), d.box.map(v => v.toFixed(1)).join(', ')])));
    drawBoxes(data, $('image').files[0]);
  }
  out.dataset.done = '1';
});
$('adapter').addEventListener('change', inputFor);
$('token').addEventListener('change', () => adapters().catch(e => { $('error').textContent = String(e); }));
adapters().catch(e => { $('error').textContent = 'could not list the adapters: ' + e; });
</script></body></html>
"""
