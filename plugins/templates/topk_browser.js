/* The unit browser of the top-k panel (see mergescope_plugins.topk.unit_browser).
   Each .ms-unit-browser element holds its data as JSON in script.ms-data; the report's
   mergescope.panel hook (report.js) calls Browser once per element. */
(function () {
  "use strict";
  function fmt(v) {
    if (v === null || v === undefined) return "NaN";
    if (Number.isInteger(v)) return String(v);
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(3);
    var s = v.toPrecision(4);
    return s.indexOf(".") >= 0 ? s.replace(/0+$/, "").replace(/\.$/, "") : s;
  }
  function make(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }
  function label(c) { return c.var + (c.model ? " [" + c.model + "]" : ""); }
  // Text that may wrap after each "_" (a <wbr>): long score names fit narrow columns.
  function breakable(e, text) {
    text.split("_").forEach(function (part, i, parts) {
      e.appendChild(document.createTextNode(part + (i < parts.length - 1 ? "_" : "")));
      if (i < parts.length - 1) e.appendChild(make("wbr"));
    });
    return e;
  }

  function Browser(root) {
    var data = JSON.parse(root.querySelector("script.ms-data").textContent);
    var select = root.querySelector("select.ms-layer");
    var thead = root.querySelector("table.ms-units thead");
    var tbody = root.querySelector("table.ms-units tbody");
    var detail = root.querySelector(".ms-detail");
    // heat: show the heatmap grids (where each unit fires) instead of the plain ones, kept across units.
    var state = {layer: 0, sort: -1, desc: false, unit: -1, heat: false};
    data.layers.forEach(function (layer, i) {
      var o = make("option", layer.name + " (" + layer.units.length + " units)");
      o.value = String(i);
      select.appendChild(o);
    });
    function order() {
      var L = data.layers[state.layer];
      var idx = L.units.map(function (_, i) { return i; });
      var col = state.sort < 0 ? L.units : L.values[state.sort];
      idx.sort(function (a, b) {
        var x = col[a], y = col[b];
        if (x === null && y === null) return a - b;
        if (x === null) return 1;
        if (y === null) return -1;
        var d = state.desc ? y - x : x - y;
        return d || a - b;
      });
      return idx;
    }
    function header() {
      var L = data.layers[state.layer];
      var tr = make("tr");
      var cols = [{key: -1, top: "unit", sub: ""}].concat(L.columns.map(function (c, i) {
        return {key: i, top: label(c), sub: c.step};
      }));
      cols.forEach(function (c) {
        var th = make("th");
        th.scope = "col";
        var b = breakable(make("button"), c.top);
        b.type = "button";
        if (c.sub) b.appendChild(make("small", c.sub));
        if (state.sort === c.key) {
          b.appendChild(document.createTextNode(state.desc ? " \u25BC" : " \u25B2"));
          th.setAttribute("aria-sort", state.desc ? "descending" : "ascending");
        }
        b.addEventListener("click", function () {
          if (state.sort === c.key) state.desc = !state.desc;
          else { state.sort = c.key; state.desc = c.key >= 0; }  // highest score first
          render();
        });
        th.appendChild(b);
        tr.appendChild(th);
      });
      thead.replaceChildren(tr);
    }
    function body() {
      var L = data.layers[state.layer];
      var rows = order().map(function (i) {
        var tr = make("tr");
        tr.dataset.index = String(i);
        tr.tabIndex = 0;
        if (i === state.unit) tr.className = "sel";
        tr.appendChild(make("td", String(L.units[i])));
        L.values.forEach(function (col) { tr.appendChild(make("td", fmt(col[i]))); });
        return tr;
      });
      tbody.replaceChildren.apply(tbody, rows);
    }
    function render() { header(); body(); }
    function show(i) {
      var L = data.layers[state.layer];
      state.unit = i;
      Array.prototype.forEach.call(tbody.children, function (tr) {
        tr.classList.toggle("sel", Number(tr.dataset.index) === i);
      });
      var parts = [make("h4", L.name + ", unit " + L.units[i])];
      if (L.files[i]) {
        var heat = L.heatmaps ? L.heatmaps[i] : "";
        var img = make("img");
        var a = make("a");
        var shown = function () {
          var src = state.heat && heat ? heat : L.files[i];
          img.src = src;
          a.href = src;
          img.alt = L.name + ", unit " + L.units[i] + (state.heat && heat ? ", where it fires" : "");
        };
        img.addEventListener("load", function () {  // readable at normal zoom: up to twice its size
          if (img.naturalWidth) img.style.width = Math.min(2 * img.naturalWidth, 1200) + "px";
        });
        if (heat) parts.push(toggle(shown));
        shown();
        a.appendChild(img);
        parts.push(a);
      }
      var strip = optimised(L, i);
      if (strip) parts.push(strip);
      if (L.columns.length) {
        var t = make("table", null, "num ms-values");
        var h = make("tr");
        ["step", "metric", "value"].forEach(function (s) { h.appendChild(make("th", s)); });
        t.appendChild(h);
        L.columns.forEach(function (c, j) {
          var tr = make("tr");
          tr.appendChild(make("td", c.step));
          tr.appendChild(make("td", label(c)));
          tr.appendChild(make("td", fmt(L.values[j][i])));
          t.appendChild(tr);
        });
        parts.push(t);
      } else {
        parts.push(make("p", "No metric step scored this layer.", "note"));
      }
      detail.replaceChildren.apply(detail, parts);
    }
    // Two buttons that switch the grid between the images and their heatmaps.
    function toggle(shown) {
      var bar = make("div", null, "ms-toggle");
      bar.setAttribute("role", "group");
      bar.setAttribute("aria-label", "Grid");
      [[false, "images"], [true, "where it fires"]].forEach(function (choice) {
        var b = make("button", choice[1]);
        b.type = "button";
        b.setAttribute("aria-pressed", String(state.heat === choice[0]));
        b.addEventListener("click", function () {
          state.heat = choice[0];
          Array.prototype.forEach.call(bar.children, function (other) {
            other.setAttribute("aria-pressed", String(other === b));
          });
          shown();
        });
        bar.appendChild(b);
      });
      return bar;
    }
    // The unit's optimised image per row (model), loaded only when scrolled into view.
    function optimised(L, i) {
      if (!L.optimised) return null;
      var figures = [];
      L.optimised[i].forEach(function (src, r) {
        if (!src) return;
        var f = make("figure");
        var a = make("a");
        a.href = src;
        var img = make("img");
        img.loading = "lazy";
        img.src = src;
        img.alt = "optimised, " + L.rows[r] + ", unit " + L.units[i];
        a.appendChild(img);
        f.appendChild(a);
        f.appendChild(make("figcaption", L.rows[r]));
        figures.push(f);
      });
      if (!figures.length) return null;
      var box = make("div", null, "ms-optimised");
      box.appendChild(make("h5", "Optimised images"));
      var row = make("div", null, "ms-strip");
      figures.forEach(function (f) { row.appendChild(f); });
      box.appendChild(row);
      return box;
    }
    function pick(ev) {
      var tr = ev.target.closest("tr");
      if (tr && tr.dataset.index !== undefined) show(Number(tr.dataset.index));
    }
    tbody.addEventListener("click", pick);
    tbody.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); pick(ev); }
    });
    select.addEventListener("change", function () {
      state.layer = Number(select.value);
      state.sort = -1;
      state.desc = false;
      render();
      show(order()[0]);
    });
    if (data.layers.length) {
      render();
      show(order()[0]);
    } else {
      detail.replaceChildren(make("p", "No units.", "note"));
    }
  }
  window.mergescope.panel(".ms-unit-browser", Browser);
})();
