/* Trawler dashboard: the little JavaScript it needs (htmx does the partial refreshes).
   - job page: live progress from the server-sent events stream;
   - confirmations for destructive buttons (forms with data-confirm);
   - "Add another field" on the submit form;
   - the jobs list's live summary (aria-live) after each refresh. */
(function () {
  "use strict";

  var TERMINAL = ["completed", "failed", "cancelled"];
  var STATUSES = ["queued", "running"].concat(TERMINAL);

  function byId(id) {
    return document.getElementById(id);
  }

  function setText(id, value) {
    var el = byId(id);
    if (el && el.textContent !== String(value)) {
      el.textContent = String(value);
    }
  }

  function fmt(n) {
    return Number(n).toLocaleString("en-US");
  }

  /* Tasks that will not run again: succeeded, failed, or not fetched (robots.txt, cancelled). */
  function finished(p) {
    return Math.max(p.total - p.queued - p.running, p.succeeded + p.failed);
  }

  /* Same wording as the server's first render (app.ui.routes.jobs.progress_summary). */
  function summary(job) {
    var p = job.progress;
    var done = finished(p);
    var text = fmt(done) + " of " + fmt(p.total) + " pages done: " + fmt(p.succeeded) +
      " succeeded, " + fmt(p.failed) + " failed";
    var skipped = done - p.succeeded - p.failed;
    if (skipped) {
      text += ", " + fmt(skipped) + " not fetched";
    }
    if (p.queued || p.running) {
      text += ", " + fmt(p.queued) + " queued, " + fmt(p.running) + " running";
    }
    return text + ". Status: " + job.status + ".";
  }

  function setStatusClass(el, status) {
    STATUSES.forEach(function (s) {
      el.classList.remove("status-" + s);
    });
    el.classList.add("status-" + status);
  }

  function showJob(job) {
    var p = job.progress;
    var bar = byId("job-progress");
    if (bar) {
      bar.max = Math.max(p.total, 1);
      bar.value = finished(p);
      setStatusClass(bar, job.status);
    }
    setText("count-total", fmt(p.total));
    setText("count-queued", fmt(p.queued));
    setText("count-running", fmt(p.running));
    setText("count-succeeded", fmt(p.succeeded));
    setText("count-failed", fmt(p.failed));
    setText("progress-text", summary(job));
    var badge = byId("job-status");
    if (badge) {
      badge.textContent = job.status;
      setStatusClass(badge, job.status);
    }
  }

  function announce(name) {
    document.body.dispatchEvent(new CustomEvent(name, { bubbles: true }));
  }

  /* Sections that follow the job (htmx, hx-trigger="trawler:progress from:body") are
     refreshed at most every PROGRESS_EVERY_MS, the last change always included. (Not htmx's
     own throttle: it would also swallow the status event that follows within the period.) */
  var PROGRESS_EVERY_MS = 2000;
  var lastProgress = 0;
  var pendingProgress = null;

  function announceProgress() {
    var wait = PROGRESS_EVERY_MS - (Date.now() - lastProgress);
    if (wait <= 0) {
      lastProgress = Date.now();
      announce("trawler:progress");
    } else if (pendingProgress === null) {
      pendingProgress = window.setTimeout(function () {
        pendingProgress = null;
        lastProgress = Date.now();
        announce("trawler:progress");
      }, wait);
    }
  }

  function cancelProgress() {
    if (pendingProgress !== null) {
      window.clearTimeout(pendingProgress);
      pendingProgress = null;
    }
  }

  function followJob() {
    var root = document.querySelector("[data-events-url]");
    if (!root || root.dataset.terminal === "true") {
      return;
    }
    if (!window.EventSource) {
      setText("live-state", "This browser cannot show live progress: reload the page to update it.");
      return;
    }
    var source = new EventSource(root.dataset.eventsUrl);
    var finished = false;
    source.addEventListener("open", function () {
      setText("live-state", "Live updates: connected.");
    });
    source.addEventListener("progress", function (event) {
      showJob(JSON.parse(event.data));
      announceProgress();
    });
    source.addEventListener("status", function (event) {
      var job = JSON.parse(event.data);
      showJob(job);
      if (TERMINAL.indexOf(job.status) >= 0) {
        // the stream ends here; without close() the browser would reconnect
        finished = true;
        source.close();
        cancelProgress();
        root.dataset.terminal = "true";
        setText("live-state", "This job has finished.");
      }
      announce("trawler:status");
    });
    source.addEventListener("deleted", function () {
      finished = true;
      source.close();
      setText("live-state", "This job was deleted.");
    });
    source.addEventListener("error", function () {
      if (finished) {
        return;
      }
      if (source.readyState === EventSource.CLOSED) {
        setText("live-state", "Live updates stopped. Reload the page to see the latest state.");
      } else {
        setText("live-state", "Live updates: reconnecting…");
      }
    });
  }

  function confirmDestructive() {
    document.addEventListener("submit", function (event) {
      var form = event.target;
      var message = form && form.dataset ? form.dataset.confirm : null;
      if (message && !window.confirm(message)) {
        event.preventDefault();
      }
    });
  }

  function addFieldRows() {
    var button = byId("add-field");
    var rows = byId("field-rows");
    if (!button || !rows) {
      return;
    }
    button.hidden = false;
    button.addEventListener("click", function () {
      var all = rows.querySelectorAll(".field-row");
      var last = all[all.length - 1];
      var index = all.length;
      var row = last.cloneNode(true);
      row.dataset.row = String(index);
      row.querySelectorAll("[id], [for], [name], [aria-describedby]").forEach(function (el) {
        ["id", "for", "name"].forEach(function (attr) {
          var value = el.getAttribute(attr);
          if (value) {
            el.setAttribute(attr, value.replace(/^f-\d+-/, "f-" + index + "-"));
          }
        });
        el.removeAttribute("aria-invalid");
        el.removeAttribute("aria-describedby");
      });
      row.querySelectorAll(".field-error").forEach(function (el) {
        el.remove();
      });
      row.querySelectorAll("input").forEach(function (input) {
        if (input.type === "checkbox") {
          input.checked = false;
        } else {
          input.value = "";
          input.removeAttribute("placeholder");
        }
      });
      row.querySelectorAll("select").forEach(function (select) {
        select.selectedIndex = 0;
      });
      var legend = row.querySelector("legend");
      if (legend) {
        legend.textContent = "Field " + (index + 1);
      }
      rows.appendChild(row);
      row.querySelector("input").focus();
    });
  }

  function focusErrors() {
    var summaryBox = byId("error-summary");
    if (summaryBox) {
      summaryBox.focus();
    }
  }

  function liveJobsSummary() {
    document.body.addEventListener("htmx:afterSettle", function () {
      var rows = byId("job-rows");
      var live = byId("jobs-live");
      if (rows && live && rows.dataset.summary !== undefined) {
        if (live.textContent !== rows.dataset.summary) {
          live.textContent = rows.dataset.summary;
        }
      }
    });
  }

  function start() {
    followJob();
    confirmDestructive();
    addFieldRows();
    focusErrors();
    liveJobsSummary();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
