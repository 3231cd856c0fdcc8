// Backup progress: while a server backup runs, ask for its progress every second and update
// the bar; reload the page when it is done (the list then shows the new archive). The page
// works without this script (a Refresh link says the same).
"use strict";
(function () {
  var job = document.getElementById("backup-job");
  if (!job || job.dataset.running !== "true") return;
  var bar = document.getElementById("backup-progress");
  var state = document.getElementById("backup-state");
  function poll() {
    fetch("/admin/backups/progress", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (p) {
        if (p.total_bytes) { bar.max = p.total_bytes; bar.value = p.done_bytes; }
        if (p.finished) { window.location.reload(); return; }
        state.textContent = "Backup running: " + Math.floor(100 * p.done_bytes / Math.max(p.total_bytes, 1)) + "%";
        setTimeout(poll, 1000);
      })
      .catch(function () { setTimeout(poll, 3000); });
  }
  setTimeout(poll, 500);
})();
