// edge-agent local page: refresh the content every few seconds without reloading the page.
// Read-only: it only fetches the page it is on (GET) and swaps in the new <main> and time.
"use strict";
(function () {
  const main = document.getElementById("content");
  if (!main) { return; }
  const seconds = Number(main.dataset.refresh) || 5;
  async function refresh() {
    try {
      const response = await fetch(window.location.href, { cache: "no-store", headers: { Accept: "text/html" } });
      if (response.ok) {
        const page = new DOMParser().parseFromString(await response.text(), "text/html");
        const fresh = page.getElementById("content");
        const updated = page.getElementById("updated");
        if (fresh) { document.getElementById("content").replaceWith(document.adoptNode(fresh)); }
        if (updated) { document.getElementById("updated").replaceWith(document.adoptNode(updated)); }
        document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
      }
    } catch (error) {
      // the agent is restarting or the network is down: keep what is shown, try again later
    }
    window.setTimeout(refresh, seconds * 1000);
  }
  window.setTimeout(refresh, seconds * 1000);
}());
