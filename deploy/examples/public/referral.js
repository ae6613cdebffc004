// The referral page of the example app: the Reditus guide's three parts in the browser.
//
//   1. Load Reditus' script (its Pageview Tracking Script snippet, unchanged but for the
//      URL, which comes from the app's config: REDITUS_SCRIPT_URL).
//   2. Get the widget token from this app's own backend (same origin). The backend asks
//      reditus-sidecar; the browser never talks to the sidecar and never sees the secret.
//   3. gr("loadReferralWidget", {product_id, auth_token, user_details}), then
//      window.referralWidget.show() when the user asks for it.
//
// No build step and no other script: this file and /reditus-config.js are all there is.
"use strict";

(function () {
  const config = window.REDITUS_CONFIG;
  const status = document.getElementById("status");
  const button = document.getElementById("refer");

  function show(state, text) {
    status.dataset.state = state;
    status.textContent = text;
  }

  // 1. Reditus' loader: until the script has arrived, gr() only queues its arguments in
  // gr.q; the script takes the queue over and runs it. So the calls below may come before
  // or after the script has loaded.
  (function (w, d, s, p, t) {
    w.gr = w.gr || function () {
      w.gr.ce = 60;
      w.gr.q = w.gr.q || [];
      w.gr.q.push(arguments);
    };
    p = d.getElementsByTagName(s)[0];
    t = d.createElement(s);
    t.async = true;
    t.src = config.scriptUrl;
    p.parentNode.insertBefore(t, p);
  })(window, document, "script");
  if (config.customerId) {
    window.gr("initCustomer", config.customerId);
    window.gr("track", "pageview");
  }

  async function getJson(path) {
    // Same origin only: the session cookie goes along, nothing leaves for another host.
    const response = await fetch(path, {
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "application/json" },
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = new Error(body.error || `${path} answered ${response.status}`);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  async function loadReferralWidget() {
    // 2. Who is signed in (for user_details) and their token, both from this app.
    const [user, answer] = await Promise.all([
      getJson("/api/me"),
      getJson("/api/reditus-token"),
    ]);
    const details = {};
    for (const key of ["email", "first_name", "last_name", "company_id", "company_name"]) {
      if (user[key]) details[key] = String(user[key]);
    }
    // 3. The product id comes with the token: it is the product whose secret signed it.
    window.gr("loadReferralWidget", {
      product_id: answer.productId,
      auth_token: answer.token,
      user_details: details,
    });
    button.disabled = false;
    show("ready", "Referral widget loaded.");
  }

  button.addEventListener("click", () => {
    // Reditus' script makes the widget available as window.referralWidget.
    if (window.referralWidget && typeof window.referralWidget.show === "function") {
      window.referralWidget.show();
    } else {
      show("ready", "The referral widget is still loading; try again in a moment.");
    }
  });

  loadReferralWidget().catch((error) => {
    if (error.status === 401) {
      document.getElementById("sign-in").hidden = false;
      show("signed-out", "Sign in to see your referral program.");
    } else if (error.status === 503) {
      show("error", "The referral program is starting; reload the page in a moment.");
    } else {
      show("error", `The referral widget is unavailable (${error.message}).`);
    }
  });
})();
