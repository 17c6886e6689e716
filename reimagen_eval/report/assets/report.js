// reimagen-eval report: draws each section's rows from window.REPORT[id] (data/<id>.js), a page at a time.
// No framework, no network: the page opens from disk. Text goes in with textContent, never as HTML.
(function () {
  "use strict";
  var GRID_PAGE = 120;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function img(src, alt, title) {
    if (!src) { var m = el("div", "thumb missing", "missing"); m.title = alt || ""; return m; }
    var i = el("img", "thumb");
    i.loading = "lazy"; i.src = src; i.alt = alt || ""; if (title) i.title = title;
    return i;
  }

  function select(label, options, onchange, testid) {
    var wrap = el("label", "ctl", label + " ");
    var s = el("select");
    s.setAttribute("data-testid", testid);
    options.forEach(function (o) { var op = el("option", null, o[1]); op.value = o[0]; s.appendChild(op); });
    s.addEventListener("change", onchange);
    wrap.appendChild(s);
    return {wrap: wrap, input: s};
  }

  function fmt(v) {
    if (v === true) return "\u2713"; if (v === false) return "\u2717";
    return typeof v === "number" ? (Math.round(v * 1000) / 1000).toString() : String(v);
  }

  function sampleCard(im, model, prompt) {
    var card = el("figure", "sample" + (im.best ? " best" : ""));
    card.appendChild(img(im.src, model + " sample " + im.index, im.path));
    var cap = el("figcaption");
    if (im.best) cap.appendChild(el("span", "badge", "best of N"));
    Object.keys(im.scores).forEach(function (k) {
      if (k === "select_score" && im.scores.faithful !== undefined) return;
      cap.appendChild(el("span", "score", k + " " + fmt(im.scores[k])));
    });
    var judge = Object.keys(im.judge || {});
    if (judge.length) {
      var attrs = el("div", "attrs");
      judge.forEach(function (k) {
        var a = el("span", im.judge[k] ? "ok" : "bad", k + (im.read && im.read[k] !== undefined && !im.judge[k] ? ": " + im.read[k] : ""));
        attrs.appendChild(a);
      });
      cap.appendChild(attrs);
    }
    card.appendChild(cap);
    return card;
  }

  function rowBlock(row, models) {
    var box = el("article", "row");
    box.setAttribute("data-pid", row.pid);
    var head = el("div", "row-head");
    head.appendChild(el("div", "prompt", row.prompt));
    var tags = el("div", "tags");
    [["entity", row.entity], ["split", row.split], ["category", row.category], ["id", row.pid]].forEach(function (t) {
      if (t[1]) tags.appendChild(el("span", "tag", t[0] + ": " + t[1]));
    });
    if (models.length > 1) tags.appendChild(el("span", "tag", "disagreement: " + fmt(row.disagreement)));
    head.appendChild(tags);
    if (row.references.length) {
      var refs = el("div", "refs");
      refs.appendChild(el("span", "lbl", "reference"));
      row.references.forEach(function (r) { refs.appendChild(img(r.src, "reference", r.path)); });
      if (row.reference_text) refs.appendChild(el("span", "ntext", row.reference_text));
      head.appendChild(refs);
    }
    if (row.sheet) {
      var d = el("details"); d.appendChild(el("summary", null, "contact sheet"));
      d.appendChild(img(row.sheet, "contact sheet")); head.appendChild(d);
    }
    box.appendChild(head);
    models.forEach(function (m) {
      var cell = row.cells[m]; if (!cell) return;
      var line = el("div", "model-line");
      line.appendChild(el("div", "model", m));
      var nb = el("div", "neighbours");
      cell.neighbours.forEach(function (n) {
        var f = el("figure", "neighbour");
        f.appendChild(img(n.src, "neighbour " + n.id, n.id));
        f.appendChild(el("figcaption", null, n.text + (n.score !== null && n.score !== undefined ? " (" + fmt(n.score) + ")" : "")));
        nb.appendChild(f);
      });
      if (!cell.neighbours.length) nb.appendChild(el("span", "none", "no neighbours"));
      line.appendChild(nb);
      var samples = el("div", "samples");
      cell.images.forEach(function (im) { samples.appendChild(sampleCard(im, m, row.prompt)); });
      line.appendChild(samples);
      box.appendChild(line);
    });
    return box;
  }

  function pager(box, page, pages, go) {
    box.textContent = "";
    if (pages <= 1) return;
    var prev = el("button", null, "\u2190 previous"); prev.disabled = page === 0;
    prev.addEventListener("click", function () { go(page - 1); });
    var next = el("button", null, "next \u2192"); next.disabled = page >= pages - 1;
    next.setAttribute("data-testid", "next");
    next.addEventListener("click", function () { go(page + 1); });
    box.appendChild(prev); box.appendChild(el("span", null, " page " + (page + 1) + " of " + pages + " ")); box.appendChild(next);
  }

  function rowsSection(sec, data) {
    var ctl = sec.querySelector(".controls"), out = sec.querySelector(".rows");
    var count = sec.querySelector(".count"), pg = sec.querySelector(".pager");
    var per = parseInt(sec.getAttribute("data-page-rows"), 10) || 20;
    var state = {split: "", category: "", view: "all", models: data.models.slice(), page: 0};
    function uniq(key) { var s = {}; data.rows.forEach(function (r) { if (r[key]) s[r[key]] = 1; }); return Object.keys(s).sort(); }
    function opts(values, all) { return [["", all]].concat(values.map(function (v) { return [v, v]; })); }
    var splits = uniq("split"), cats = uniq("category");
    if (splits.length) ctl.appendChild(select("split", opts(splits, "all splits"), function (e) { state.split = e.target.value; state.page = 0; draw(); }, "filter-split").wrap);
    if (cats.length > 1) ctl.appendChild(select("category", opts(cats, "all categories"), function (e) { state.category = e.target.value; state.page = 0; draw(); }, "filter-category").wrap);
    if (data.models.length > 1) {
      ctl.appendChild(select("view", [["all", "all prompts"], ["disagree", "disagreements first"]], function (e) { state.view = e.target.value; state.page = 0; draw(); }, "filter-view").wrap);
      ctl.appendChild(select("model", opts(data.models, "all models"), function (e) {
        state.models = e.target.value ? [e.target.value] : data.models.slice(); draw();
      }, "filter-model").wrap);
    }
    function draw() {
      var rows = data.rows.filter(function (r) {
        return (!state.split || r.split === state.split) && (!state.category || r.category === state.category);
      });
      if (state.view === "disagree") {
        rows = rows.filter(function (r) { return r.disagreement > 0; });
        rows.sort(function (a, b) { return b.disagreement - a.disagreement; });
      }
      var pages = Math.max(1, Math.ceil(rows.length / per));
      state.page = Math.min(state.page, pages - 1);
      out.textContent = "";
      rows.slice(state.page * per, (state.page + 1) * per).forEach(function (r) { out.appendChild(rowBlock(r, state.models)); });
      count.textContent = rows.length + " of " + data.rows.length + " prompts";
      count.setAttribute("data-rows", rows.length);
      pager(pg, state.page, pages, function (p) { state.page = p; draw(); sec.scrollIntoView(); });
    }
    draw();
  }

  function gridSection(sec, data) {
    var ctl = sec.querySelector(".controls"), out = sec.querySelector(".rows");
    var count = sec.querySelector(".count"), pg = sec.querySelector(".pager");
    var points = Object.keys(data.points);
    var state = {point: points[0] || "", page: 0};
    if (points.length > 1) ctl.appendChild(select("guidance point", points.map(function (p) { return [p, p]; }), function (e) { state.point = e.target.value; state.page = 0; draw(); }, "filter-point").wrap);
    function draw() {
      var images = data.points[state.point] || [];
      var pages = Math.max(1, Math.ceil(images.length / GRID_PAGE));
      out.textContent = "";
      var grid = el("div", "grid");
      images.slice(state.page * GRID_PAGE, (state.page + 1) * GRID_PAGE).forEach(function (im) {
        var f = el("figure", "cell");
        f.appendChild(img(im.src, im.pid, im.pid + ": " + im.prompt));
        grid.appendChild(f);
      });
      out.appendChild(grid);
      count.textContent = images.length + " images at " + state.point;
      count.setAttribute("data-rows", images.length);
      pager(pg, state.page, pages, function (p) { state.page = p; draw(); });
    }
    draw();
  }

  var all = window.REPORT || {};
  Array.prototype.forEach.call(document.querySelectorAll("section.section"), function (sec) {
    var data = all[sec.id];
    if (!data) return;
    (data.kind === "grid" ? gridSection : rowsSection)(sec, data);
  });
  document.body.setAttribute("data-ready", "1");
})();
