/* The latent dashboard of a crosscoder (see mergescope_plugins.latent_dashboard).
   Each .ms-latent-dashboard element holds its data as JSON in script.ld-data: names, and
   columns as typed arrays (base64 of little-endian bytes). The table is virtualised: only
   the rows in view are in the DOM, so 10,000 latents sort, filter and scroll at once. A
   latent's sheet of top images is an image loaded when the latent is opened. The report's
   mergescope.panel hook (report.js) calls Dashboard once per element. */
(function () {
  "use strict";
  var ROW = 24;  // px per table row: .ld-row's height in latent_dashboard.css
  var TYPES = {f4: Float32Array, i4: Int32Array, u4: Uint32Array, u2: Uint16Array, u1: Uint8Array};

  function decode(column) {
    var text = atob(column.b), bytes = new Uint8Array(text.length);
    for (var i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    return new TYPES[column.t](bytes.buffer);
  }
  function fmt(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "NaN";
    if (Number.isInteger(v)) return String(v);
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
    var s = v.toPrecision(3);
    return s.indexOf(".") >= 0 ? s.replace(/0+$/, "").replace(/\.$/, "") : s;
  }
  function make(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }
  function pad(i) { var s = String(i); while (s.length < 5) s = "0" + s; return s; }

  function Dashboard(root) {
    var data = JSON.parse(root.querySelector("script.ld-data").textContent);
    var n = data.n, M = data.models.length, P = data.pairs.length;
    var col = {};
    Object.keys(data.cols).forEach(function (k) { col[k] = decode(data.cols[k]); });
    var hist = data.hist ? {
      height: decode(data.hist.height), peak: decode(data.hist.peak),
      total: decode(data.hist.total), high: decode(data.hist.high)
    } : null;
    var sheets = data.sheets ? {rows: decode(data.sheets.rows), vmax: decode(data.sheets.vmax)} : null;

    // The table's columns: a getter per latent, numeric unless it says otherwise.
    var columns = [
      {name: "latent", get: function (i) { return i; }, show: String},
      {name: "class", get: function (i) { return col["class"][i]; },
       show: function (i) { return data.classes[col["class"][i]]; }, text: true}
    ];
    data.models.forEach(function (m, j) {
      columns.push({name: "rel. norm", sub: m, get: function (i) { return col.relative_norm[i * M + j]; }});
    });
    data.pairs.forEach(function (p, j) {
      columns.push({name: "cosine", sub: p, get: function (i) { return col.cosine[i * P + j]; }});
    });
    columns.push({name: "density", get: function (i) { return col.density[i]; }});
    columns.push({name: "max act.", get: function (i) { return col.max[i]; }});
    columns.forEach(function (c) { if (!c.show) c.show = function (i) { return fmt(c.get(i)); }; });

    var state = {sort: 0, desc: false, klass: -1, filter: -1, lo: NaN, hi: NaN, selected: -1};
    var view = new Int32Array(0);

    // ---- controls: class, a numeric range on any column, the count shown
    var controls = root.querySelector(".ld-controls");
    var klass = make("select", null, "ld-class");
    var counts = new Array(data.classes.length).fill(0);
    for (var i = 0; i < n; i++) counts[col["class"][i]]++;
    klass.appendChild(new Option("every class (" + n + ")", "-1"));
    data.classes.forEach(function (c, j) { klass.appendChild(new Option(c + " (" + counts[j] + ")", String(j))); });
    var which = make("select", null, "ld-column");
    columns.forEach(function (c, j) {
      if (!c.text) which.appendChild(new Option(c.name + (c.sub ? " " + c.sub : ""), String(j)));
    });
    which.value = String(columns.length - 2);  // density
    var lo = make("input", null, "ld-lo"), hi = make("input", null, "ld-hi");
    [lo, hi].forEach(function (e, j) {
      e.type = "number"; e.step = "any"; e.placeholder = j ? "max" : "min"; e.size = 7;
    });
    var shown = make("span", null, "ld-count");
    var lab1 = make("label", "Class "), lab2 = make("label", "Where ");
    lab1.appendChild(klass);
    lab2.appendChild(which);
    lab2.appendChild(document.createTextNode(" from "));
    lab2.appendChild(lo);
    lab2.appendChild(document.createTextNode(" to "));
    lab2.appendChild(hi);
    controls.replaceChildren(lab1, lab2, shown,
      make("span", "Click a header to sort, a latent to see it.", "ld-hint"));

    // ---- the virtual table: a header, and a scroller holding only the rows in view
    var table = root.querySelector(".ld-table");
    var template = "4.2em 9.5em " + (M + P ? "repeat(" + (M + P) + ", 5.6em) " : "") + "5.6em 5.6em";
    table.style.setProperty("--ld-cols", template);
    var head = make("div", null, "ld-head");
    head.setAttribute("role", "row");
    var scroller = make("div", null, "ld-scroll");
    scroller.tabIndex = 0;
    scroller.setAttribute("aria-label", "latents");
    var sizer = make("div", null, "ld-sizer");
    scroller.appendChild(sizer);
    table.replaceChildren(head, scroller);

    function header() {
      var cells = columns.map(function (c, j) {
        var b = make("button", c.name);
        b.type = "button";
        b.setAttribute("role", "columnheader");
        b.title = c.name + (c.sub ? " " + c.sub : "");
        if (c.sub) b.appendChild(make("small", c.sub));
        if (state.sort === j) {
          b.appendChild(document.createTextNode(state.desc ? " \u25BC" : " \u25B2"));
          b.setAttribute("aria-sort", state.desc ? "descending" : "ascending");
        }
        b.addEventListener("click", function () {
          if (state.sort === j) state.desc = !state.desc;
          else { state.sort = j; state.desc = j >= 2; }  // a number: highest first
          update();
        });
        return b;
      });
      head.replaceChildren.apply(head, cells);
    }
    function update() {
      var c = columns[Number(which.value)];
      state.klass = Number(klass.value);
      state.lo = lo.value === "" ? NaN : Number(lo.value);
      state.hi = hi.value === "" ? NaN : Number(hi.value);
      var kept = [];
      for (var i = 0; i < n; i++) {
        if (state.klass >= 0 && col["class"][i] !== state.klass) continue;
        if (!Number.isNaN(state.lo) || !Number.isNaN(state.hi)) {
          var v = c.get(i);
          if (Number.isNaN(v) || v < state.lo || v > state.hi) continue;
        }
        kept.push(i);
      }
      var key = columns[state.sort], values = new Float64Array(n);
      kept.forEach(function (i) { values[i] = key.get(i); });
      var sign = state.desc ? -1 : 1;
      kept.sort(function (a, b) {
        var x = values[a], y = values[b];
        var nx = Number.isNaN(x), ny = Number.isNaN(y);
        if (nx || ny) return nx === ny ? a - b : (nx ? 1 : -1);  // NaN last either way
        return (x - y) * sign || a - b;
      });
      view = Int32Array.from(kept);
      shown.textContent = view.length + " of " + n + " latents";
      sizer.style.height = view.length * ROW + "px";
      scroller.scrollTop = 0;
      header();
      paint();
    }
    var pending = false;
    function paint() {
      pending = false;
      var top = scroller.scrollTop, height = scroller.clientHeight || 480;
      var first = Math.max(0, Math.floor(top / ROW) - 5);
      var last = Math.min(view.length, Math.ceil((top + height) / ROW) + 5);
      var rows = [];
      for (var j = first; j < last; j++) {
        var i = view[j], r = make("div", null, i === state.selected ? "ld-row sel" : "ld-row");
        r.style.top = j * ROW + "px";
        r.dataset.latent = String(i);
        r.setAttribute("role", "row");
        columns.forEach(function (c) { r.appendChild(make("span", c.show(i))); });
        rows.push(r);
      }
      sizer.replaceChildren.apply(sizer, rows);
    }
    scroller.addEventListener("scroll", function () {
      if (!pending) { pending = true; window.requestAnimationFrame(paint); }
    });
    sizer.addEventListener("click", function (ev) {
      var r = ev.target.closest(".ld-row");
      if (r) show(Number(r.dataset.latent));
    });
    scroller.addEventListener("keydown", function (ev) {
      if (ev.key !== "ArrowDown" && ev.key !== "ArrowUp") return;
      ev.preventDefault();
      var at = view.indexOf(state.selected) + (ev.key === "ArrowDown" ? 1 : -1);
      if (at < 0 || at >= view.length) return;
      if (at * ROW < scroller.scrollTop) scroller.scrollTop = at * ROW;
      if ((at + 1) * ROW > scroller.scrollTop + scroller.clientHeight) {
        scroller.scrollTop = (at + 1) * ROW - scroller.clientHeight;
      }
      show(view[at]);
    });
    [klass, which].forEach(function (e) { e.addEventListener("change", update); });
    [lo, hi].forEach(function (e) { e.addEventListener("input", update); });

    // ---- one latent: its numbers, decoder-norm bars, histograms and top images
    var detail = root.querySelector(".ld-detail");
    function bars(i) {
      var box = make("div", null, "ld-bars");
      var most = 0;
      for (var m = 0; m < M; m++) most = Math.max(most, col.decoder_norm[i * M + m] || 0);
      data.models.forEach(function (name, m) {
        var v = col.decoder_norm[i * M + m], line = make("div", null, "ld-bar");
        var bar = make("span", null, "ld-fill");
        bar.style.width = (most > 0 ? 100 * v / most : 0).toFixed(1) + "%";
        var track = make("span", null, "ld-track");
        track.appendChild(bar);
        line.appendChild(make("span", name, "ld-name"));
        line.appendChild(track);
        line.appendChild(make("span", fmt(v), "ld-value"));
        box.appendChild(line);
      });
      return box;
    }
    function histograms(i) {
      var box = make("div", null, "ld-hists"), B = data.hist.bins, R = data.hist.rows.length;
      var high = hist.high[i];
      data.hist.rows.forEach(function (name, r) {
        var at = i * R + r, part = make("div", null, "ld-hist");
        part.appendChild(make("div", name + ": fires on " + hist.total[at] + " rows (peak " + hist.peak[at] + ")",
          "ld-caption"));
        var plot = make("div", null, "ld-plot");
        for (var b = 0; b < B; b++) {
          var h = hist.height[at * B + b], bin = make("span");
          bin.style.height = (100 * h / 255).toFixed(1) + "%";
          bin.title = fmt(high * b / B) + " to " + fmt(high * (b + 1) / B);
          plot.appendChild(bin);
        }
        part.appendChild(plot);
        var axis = make("div", null, "ld-axis");
        axis.appendChild(make("span", "0"));
        axis.appendChild(make("span", fmt(high)));
        part.appendChild(axis);
        box.appendChild(part);
      });
      return box;
    }
    function sheet(i) {
      var rows = sheets.rows[i];
      if (!rows) return make("p", "No images: the latent fired on none of its top samples.", "note");
      var s = data.sheets, figure = make("figure", null, "ld-sheet");
      var labels = make("div", null, "ld-labels");
      var names = rows > 1 ? s.labels : ["top images"];
      names.forEach(function (name) {
        var e = make("div", name);
        e.style.height = s.tile + "px";
        e.style.marginBottom = s.gap + "px";
        labels.appendChild(e);
      });
      var img = make("img");
      img.loading = "lazy";
      img.alt = "latent " + i + ": top images" + (rows > 1 ? " and heatmaps" : "");
      img.src = s.files ? s.files[i] : s.dir + "latent-" + pad(i) + ".png";
      var samples = [], values = [];
      for (var r = 0; r < data.k; r++) {
        samples.push(col.top_sample[i * data.k + r]);
        values.push(fmt(col.top_value[i * data.k + r]));
      }
      img.title = "samples " + samples.join(", ");
      var row = make("div", null, "ld-sheet-row");
      row.appendChild(labels);
      row.appendChild(img);
      figure.appendChild(row);
      // Shrunk to the panel's width when wider, the row labels beside their rows.
      img.addEventListener("load", function () {
        var room = row.clientWidth - labels.offsetWidth - 8;
        var scale = room > 0 && img.naturalWidth > room ? room / img.naturalWidth : 1;
        img.style.width = (img.naturalWidth * scale).toFixed(1) + "px";
        Array.prototype.forEach.call(labels.children, function (e) {
          e.style.height = (s.tile * scale).toFixed(2) + "px";
          e.style.marginBottom = (s.gap * scale).toFixed(2) + "px";
        });
      });
      var note = "activations " + values.join(", ");
      if (rows > 1) note += "; heatmap scale 0 to " + fmt(sheets.vmax[i]);
      figure.appendChild(make("figcaption", note));
      return figure;
    }
    function show(i) {
      state.selected = i;
      Array.prototype.forEach.call(sizer.children, function (r) {
        r.classList.toggle("sel", Number(r.dataset.latent) === i);
      });
      var parts = [make("h5", "latent " + i + ": " + data.classes[col["class"][i]])];
      var facts = make("table", null, "num ld-facts"), rows = [["density", col.density[i]],
        ["max activation", col.max[i]]];
      data.models.forEach(function (m, j) { rows.push(["relative norm " + m, col.relative_norm[i * M + j]]); });
      data.pairs.forEach(function (p, j) { rows.push(["cosine " + p, col.cosine[i * P + j]]); });
      rows.forEach(function (pair) {
        var tr = make("tr");
        tr.appendChild(make("td", pair[0]));
        tr.appendChild(make("td", fmt(pair[1])));
        facts.appendChild(tr);
      });
      var side = make("div", null, "ld-side");
      side.appendChild(facts);
      side.appendChild(make("h6", "decoder norm"));
      side.appendChild(bars(i));
      var top = make("div", null, "ld-top");
      top.appendChild(side);
      if (hist) {
        var h = make("div", null, "ld-side");
        h.appendChild(make("h6", "activation on the rows where it fires"));
        h.appendChild(histograms(i));
        top.appendChild(h);
      }
      parts.push(top);
      parts.push(sheets ? sheet(i) : make("p", "No images: this step drew none.", "note"));
      detail.replaceChildren.apply(detail, parts);
    }

    update();
    if (view.length) show(view[0]);
    root.setAttribute("data-ld-ready", "");
  }
  window.mergescope.panel(".ms-latent-dashboard", Dashboard);
})();
