// sessionbus console: live updates (server-sent events) and the overview's small charts.
// The pages work without it; it only adds what changes while a page is open.
"use strict";

(function () {
  function text(el, value) { if (el) { el.textContent = value; } }

  function sessionsPage() {
    var table = document.getElementById("sessions-table");
    var live = document.getElementById("live-status");
    if (!table || !live || live.dataset.live !== "on" || !window.EventSource) { return; }
    var body = document.getElementById("sessions-body");
    var newCount = 0;
    var canInsert = table.dataset.firstPage === "yes" && table.dataset.order === "newest" && table.dataset.filtered === "no";
    var source = new EventSource("/sessions/feed");
    source.addEventListener("session", function (message) {
      var item = JSON.parse(message.data);
      var row = document.getElementById("session-" + item.session_id);
      if (row) {
        if (item.status) {
          var badge = row.querySelector("[data-testid=session-status]");
          if (badge) { badge.textContent = item.status; badge.className = "badge " + item.status; }
        }
        text(row.querySelector("[data-testid=session-version]"), String(item.version));
        text(row.querySelector("[data-testid=session-activity]"), "just now");
        if (item.destroyed) { row.classList.add("later"); }
        row.classList.add("flash-update");
        window.setTimeout(function () { row.classList.remove("flash-update"); }, 1500);
      } else if (item.type === "session.created") {
        if (canInsert && body) {
          table.hidden = false;
          var empty = document.getElementById("sessions-empty");
          if (empty) { empty.hidden = true; }
          body.insertBefore(newRow(item), body.firstChild);
        } else {
          newCount += 1;
          var note = document.getElementById("live-new");
          text(document.getElementById("live-new-count"), String(newCount));
          var link = document.getElementById("live-new-link");
          if (link) { link.href = window.location.pathname + window.location.search; }
          if (note) { note.hidden = false; }
        }
      }
    });
    // The console's broker connection was lost and restored: events may be missing
    // from this stream, so the view is read again from the coordinator.
    source.addEventListener("resync", function () { source.close(); window.location.reload(); });
    window.addEventListener("pagehide", function () { source.close(); });
  }

  function cell(content) {
    var td = document.createElement("td");
    if (typeof content === "string") { td.textContent = content; } else { td.appendChild(content); }
    return td;
  }

  function newRow(item) {
    var tr = document.createElement("tr");
    tr.id = "session-" + item.session_id;
    tr.dataset.testid = "session-row";
    tr.setAttribute("data-testid", "session-row");
    tr.dataset.sessionId = item.session_id;
    var link = document.createElement("a");
    link.className = "mono";
    link.href = "/sessions/" + item.session_id;
    link.textContent = item.session_id;
    var badge = document.createElement("span");
    badge.className = "badge " + item.status;
    badge.setAttribute("data-testid", "session-status");
    badge.textContent = item.status;
    var version = cell(String(item.version));
    version.setAttribute("data-testid", "session-version");
    var activity = cell("just now");
    activity.setAttribute("data-testid", "session-activity");
    [cell(link), cell(badge), cell("new"), cell(item.created_at.replace("T", " ").slice(0, 23)),
     activity, version, cell("-")].forEach(function (td) { tr.appendChild(td); });
    tr.classList.add("flash-update");
    window.setTimeout(function () { tr.classList.remove("flash-update"); }, 1500);
    return tr;
  }

  function sessionPage() {
    var live = document.getElementById("live-status");
    if (!live || live.dataset.live !== "on" || !live.dataset.sessionId || !window.EventSource) { return; }
    var count = 0;
    var source = new EventSource("/sessions/feed?session=" + encodeURIComponent(live.dataset.sessionId));
    source.addEventListener("session", function () {
      count += 1;
      text(document.getElementById("live-new-count"), String(count));
      var note = document.getElementById("live-new");
      if (note) { note.hidden = false; }
    });
    // The console's broker connection was lost and restored: events may be missing
    // from this stream, so the view is read again from the coordinator.
    source.addEventListener("resync", function () { source.close(); window.location.reload(); });
    window.addEventListener("pagehide", function () { source.close(); });
  }

  function overviewPage() {
    var events = document.getElementById("chart-events");
    if (!events) { return; }
    var samples = [];
    var keep = 300; // 10 minutes at one sample every 2 s

    function draw(svg, values) {
      while (svg.firstChild) { svg.removeChild(svg.firstChild); }
      if (values.length < 2) { return; }
      var most = Math.max.apply(null, values.concat([1]));
      var step = 300 / (keep - 1);
      var start = 300 - step * (values.length - 1);
      var points = values.map(function (v, i) {
        return (start + i * step).toFixed(1) + "," + (78 - (v / most) * 74).toFixed(1);
      }).join(" ");
      var line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
      line.setAttribute("points", points);
      svg.appendChild(line);
    }

    function poll() {
      fetch("/overview/figures", { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (figures) {
          if (!figures) { return; }
          var at = Date.parse(figures.at);
          var last = samples[samples.length - 1];
          var seconds = last ? Math.max((at - last.at) / 1000, 0.001) : 1;
          var rate = last ? Math.max(0, (figures.store_position - last.position) / seconds) : 0;
          var commands = last ? Math.max(0, (figures.commands_handled - last.commands) / seconds) : 0;
          samples.push({ at: at, position: figures.store_position, commands: figures.commands_handled,
                         rate: rate, commandRate: commands, lag: figures.relay_lag });
          if (samples.length > keep) { samples.shift(); }
          draw(events, samples.slice(1).map(function (s) { return s.rate; }));
          draw(document.getElementById("chart-commands"), samples.slice(1).map(function (s) { return s.commandRate; }));
          text(document.getElementById("now-commands"), commands.toFixed(1) + " commands/s now");
          draw(document.getElementById("chart-lag"), samples.map(function (s) { return s.lag; }));
          text(document.getElementById("now-events"), rate.toFixed(1) + " events/s now");
          text(document.getElementById("now-lag"), figures.relay_lag + " now");
          ["sessions_active", "sessions_total", "store_position", "relay_lag"].forEach(function (name) {
            var el = document.querySelector("[data-figure=" + name + "]");
            text(el, String(figures[name]));
          });
        })
        .catch(function () { /* the next poll tries again */ });
    }
    poll();
    window.setInterval(poll, 2000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var page = document.body.dataset.page;
    if (page === "sessions") { sessionsPage(); }
    if (page === "session") { sessionPage(); }
    if (page === "overview") { overviewPage(); }
  });
})();
