/* The report's script: the hook through which panels bring their HTML to life.

   A panel's script (mergescope.report.Panel js, inlined after this one) calls
   mergescope.panel(selector, init): init(element) runs once for every element of the page
   that matches selector, after the page is parsed. A failing init is logged and the other
   panels still start. */
(function () {
  "use strict";
  function start(selector, init) {
    document.querySelectorAll(selector).forEach(function (element) {
      if (element.hasAttribute("data-ms-ready")) return;
      element.setAttribute("data-ms-ready", "");
      try {
        init(element);
      } catch (err) {
        console.error("mergescope report: a panel (" + selector + ") failed:", err);
      }
    });
  }
  window.mergescope = {
    panel: function (selector, init) {
      if (document.readyState === "loading") {
        document.addEventListener("DOMContentLoaded", function () { start(selector, init); });
      } else {
        start(selector, init);
      }
    }
  };
})();
