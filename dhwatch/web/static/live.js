// Live updates of the file list: rows change state in place, new files appear at the top.
// The page works without this script (reload to see changes); it only listens to /events.
(function () {
  "use strict";
  var table = document.getElementById("files");
  if (!table || !window.EventSource) { return; }
  var body = table.tBodies[0];
  var firstPage = table.getAttribute("data-first-page") === "true";
  // A row added live: the list is no longer empty, and its total grows by one.
  function counted() {
    var empty = document.getElementById("empty");
    if (empty) { empty.parentNode.removeChild(empty); }
    var total = document.getElementById("total");
    if (!total) { return; }
    var n = (parseInt(total.getAttribute("data-total"), 10) || 0) + 1;
    total.setAttribute("data-total", String(n));
    total.textContent = n.toLocaleString("en-US") + (n === 1 ? " file" : " files");
  }
  var source = new EventSource(table.getAttribute("data-events"));
  source.addEventListener("file", function (message) {
    var change = JSON.parse(message.data);
    var holder = document.createElement("tbody");
    holder.innerHTML = change.html.trim();
    var fresh = holder.firstElementChild;
    if (!fresh) { return; }
    var current = body.querySelector('tr[data-file-id="' + change.id + '"]');
    if (current) {
      if (current.getAttribute("data-state") !== change.state) { fresh.classList.add("flash"); }
      body.replaceChild(fresh, current);
    } else if (change.matches && firstPage) {
      fresh.classList.add("flash");
      body.insertBefore(fresh, body.firstElementChild);
      counted();
    }
  });
})();
