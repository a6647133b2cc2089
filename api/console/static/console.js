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
        // A confirmation opened while this was fetched stays open: its rows wait a refresh.
        if (fresh && old && !old.querySelector("dialog[open]")) old.replaceWith(fresh);
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
    // What changed is rendered by the server (api/console/progress.py, transcript.py): on
    // news, fetch those parts of the page again, at most every half second.
    var due = null;
    var refetch = function () {
      if (due) return;
      due = setTimeout(function () {
        due = null;
        swapFrom(window.location.pathname, ["progress", "events", "transcript-section"]);
      }, 500);
    };
    var onEvent = function (ev) {
      var data = JSON.parse(ev.data);
      var badge = document.querySelector("h1 .state");
      if (badge) badge.replaceWith(stateBadge(data.state));
      if (TERMINAL.indexOf(data.state) >= 0) {
        source.close();
        swapFrom(window.location.pathname, ["agent"]);
      } else {
        refetch();
      }
    };
    source.addEventListener("state", onEvent);
    source.addEventListener("progress", onEvent);
    source.addEventListener("transcript", refetch);
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
    // A confirmation open in a row would vanish with the row it is in: wait until it closes.
    if (document.querySelector("dialog[open]")) { setTimeout(refresh, 1000); return; }
    swapFrom(window.location.href, lists.map(function (t) { return t.id; })).then(function () {
      lists = Array.prototype.slice.call(document.querySelectorAll("table.live-list tbody[id]"));
      setTimeout(refresh, 2000);
    }, function () { setTimeout(refresh, 5000); });
  }
  if (lists.length) setTimeout(refresh, 2000);
})();
