// The console's only script: confirmation dialogs where the browser lacks invoker commands,
// copy buttons, and live states (EventSource on an agent's page, a light refetch of lists).
// Every page reads fine without it.
(function () {
  "use strict";
  var TERMINAL = ["completed", "failed", "killed", "timed_out"];

  // <button commandfor="id" command="show-modal|close"> for browsers without invoker commands.
  if (!("command" in HTMLButtonElement.prototype)) {
    document.addEventListener("click", function (ev) {
      var button = ev.target.closest("button[commandfor]");
      if (!button) return;
      var dialog = document.getElementById(button.getAttribute("commandfor"));
      if (!dialog) return;
      if (button.getAttribute("command") === "show-modal") dialog.showModal();
      else dialog.close();
    });
  }

  document.addEventListener("click", function (ev) {
    var button = ev.target.closest("button[data-copy]");
    if (!button || !navigator.clipboard) return;
    navigator.clipboard.writeText(button.getAttribute("data-copy")).then(function () {
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = "Copy"; }, 1500);
    });
  });

  function swapFrom(url, ids) {
    return fetch(url, { credentials: "same-origin" }).then(function (r) {
      if (!r.ok) throw new Error("status " + r.status);
      return r.text();
    }).then(function (html) {
      var doc = new DOMParser().parseFromString(html, "text/html");
      ids.forEach(function (id) {
        var fresh = doc.getElementById(id), old = document.getElementById(id);
        if (fresh && old) old.replaceWith(fresh);
      });
      return doc;
    });
  }

  function stateBadge(state) {
    var span = document.createElement("span");
    span.className = "state state-" + state;
    span.setAttribute("data-state", state);
    span.textContent = state;
    return span;
  }

  // An agent's page: follow its event stream; at the end, show the result without a reload.
  var agent = document.getElementById("agent");
  if (agent && agent.getAttribute("data-terminal") === "no" && window.EventSource) {
    var id = agent.getAttribute("data-agent");
    var source = new EventSource("/console/agents/" + id + "/events");
    var onEvent = function (ev) {
      var data = JSON.parse(ev.data);
      var badge = document.querySelector("h1 .state");
      if (badge) badge.replaceWith(stateBadge(data.state));
      var li = document.createElement("li");
      li.appendChild(stateBadge(data.state));
      li.appendChild(document.createTextNode(" " + data.at.replace("T", " ").slice(0, 19) + " UTC"));
      document.getElementById("events").appendChild(li);
      if (data.progress) {
        var dl = document.createElement("dl");
        dl.className = "facts";
        Object.keys(data.progress).forEach(function (k) {
          var dt = document.createElement("dt"), dd = document.createElement("dd");
          var code = document.createElement("code");
          dt.textContent = k;
          code.textContent = typeof data.progress[k] === "string" ? data.progress[k] : JSON.stringify(data.progress[k]);
          dd.appendChild(code);
          dl.appendChild(dt);
          dl.appendChild(dd);
        });
        var box = document.getElementById("progress");
        box.innerHTML = "";
        box.appendChild(dl);
      }
      if (TERMINAL.indexOf(data.state) >= 0) {
        source.close();
        swapFrom(window.location.pathname, ["agent"]);
      }
    };
    source.addEventListener("state", onEvent);
    source.addEventListener("progress", onEvent);
    // Transcript entries are rendered by the server (api/console/transcript.py): on news,
    // fetch the section again, at most every half second.
    var transcriptDue = null;
    source.addEventListener("transcript", function () {
      if (transcriptDue) return;
      transcriptDue = setTimeout(function () {
        transcriptDue = null;
        swapFrom(window.location.pathname, ["transcript-section"]);
      }, 500);
    });
  }

  // Lists: while an agent shown is not finished, fetch the same page again now and then.
  var lists = Array.prototype.slice.call(document.querySelectorAll("table.live-list tbody[id]"));
  function unfinished() {
    return lists.some(function (tbody) {
      return Array.prototype.some.call(tbody.querySelectorAll("[data-state]"), function (el) {
        return TERMINAL.indexOf(el.getAttribute("data-state")) < 0;
      });
    });
  }
  function refresh() {
    if (!unfinished()) return;
    swapFrom(window.location.href, lists.map(function (t) { return t.id; })).then(function () {
      lists = Array.prototype.slice.call(document.querySelectorAll("table.live-list tbody[id]"));
      setTimeout(refresh, 2000);
    }, function () { setTimeout(refresh, 5000); });
  }
  if (lists.length) setTimeout(refresh, 2000);
})();
