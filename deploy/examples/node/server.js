// The Reditus guide's Express route, rewritten to ask reditus-sidecar for the token.
//
// Before (the guide): the app held the product secret and signed the token itself:
//
//   import { SignJWT } from "jose";
//   app.get("/api/reditus-token", async (req, res) => {
//     const key = new TextEncoder().encode(process.env.REDITUS_PRODUCT_SECRET);
//     const token = await new SignJWT({
//       ProductId: process.env.REDITUS_PRODUCT_ID,
//       UserId: req.user.id,
//       iat: Math.floor(Date.now() / 1000),
//     }).setProtectedHeader({ alg: "HS512", typ: "JWT" }).sign(key);
//     res.json({ token });
//   });
//
// After: the secret stays in Vault and the sidecar; the app only asks on loopback.
//
//   REDITUS_SIDECAR_URL=http://127.0.0.1:8787 PORT=3000 node server.js
//   curl -H 'X-Example-User: u-123' localhost:3000/api/reditus-token
//
// And the page (../public/, shared with the Python example): open http://localhost:3000/example-login?id=u-123&email=a@b.c
// It loads Reditus' script, gets the token from /api/reditus-token (this app, same origin)
// and calls gr("loadReferralWidget", {product_id, auth_token, user_details}).

import express from "express";
import { fileURLToPath } from "node:url";

const SIDECAR_URL = process.env.REDITUS_SIDECAR_URL ?? "http://127.0.0.1:8787";
const HOST = process.env.HOST ?? "127.0.0.1";
const PORT = Number(process.env.PORT ?? 3000);
// Reditus' script (the Pageview Tracking Script, which also loads the referral widget).
const REDITUS_SCRIPT_URL = process.env.REDITUS_SCRIPT_URL ?? "https://script.getreditus.com/v2.js";
// Optional: your Reditus customer id, for the snippet's gr("initCustomer") and pageview.
const REDITUS_CUSTOMER_ID = process.env.REDITUS_CUSTOMER_ID ?? "";
const PUBLIC_DIR = fileURLToPath(new URL("../public/", import.meta.url));
const SESSION_COOKIE = "example_user";
const USER_FIELDS = ["id", "email", "first_name", "last_name", "company_id", "company_name"];

/** Asks the sidecar for a token for one user. Throws SidecarError on any failure. */
export async function fetchReditusToken(userId, { product } = {}) {
  let response;
  try {
    response = await fetch(`${SIDECAR_URL}/v1/token`, {
      method: "POST",
      headers: {
        "Content-Type": "application/json",
        // The sidecar refuses requests without it (a guard against SSRF).
        "X-Sidecar-Request": "true",
      },
      body: JSON.stringify(product ? { userId, product } : { userId }),
      signal: AbortSignal.timeout(2000),
    });
  } catch (err) {
    throw new SidecarError(502, "sidecar_unreachable", null, { cause: err });
  }
  if (!response.ok) {
    // Errors are {"error": {"code", "message"}}; they never contain the secret.
    const body = await response.json().catch(() => ({}));
    const code = body?.error?.code ?? "sidecar_error";
    throw new SidecarError(response.status, code, response.headers.get("Retry-After"));
  }
  return response.json(); // {token, productId, issuedAt}
}

export class SidecarError extends Error {
  constructor(status, code, retryAfter, options) {
    super(`reditus-sidecar answered ${status} ${code}`, options);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

// --- Stand-in for your session: NOT a login. --------------------------------------------
// Anyone can claim any user here (the X-Example-User header, or the cookie that
// /example-login sets from its query string). In your app req.user comes from your login
// and these two functions and the /example-login route go away.
function exampleUser(req) {
  const id = req.get("X-Example-User");
  if (id) return { id };
  const cookie = (req.get("Cookie") ?? "")
    .split(";")
    .map((part) => part.trim())
    .find((part) => part.startsWith(`${SESSION_COOKIE}=`));
  if (!cookie) return null;
  try {
    const saved = JSON.parse(decodeURIComponent(cookie.slice(SESSION_COOKIE.length + 1)));
    const user = Object.fromEntries(
      USER_FIELDS.filter((key) => typeof saved?.[key] === "string").map((key) => [key, saved[key]]),
    );
    return user.id ? user : null;
  } catch {
    return null;
  }
}

function requireUser(req, res, next) {
  const user = exampleUser(req);
  if (!user) {
    res.status(401).json({ error: "not signed in" });
    return;
  }
  req.user = user;
  next();
}
// ------------------------------------------------------------------------------------------

export const app = express();

// The stand-in login: /example-login?id=u-123&email=...&first_name=...&last_name=...
app.get("/example-login", (req, res) => {
  const user = {};
  for (const key of USER_FIELDS) {
    if (typeof req.query[key] === "string" && req.query[key]) user[key] = req.query[key];
  }
  if (!user.id) {
    res.status(400).type("text").send("example-login needs ?id=USER_ID (email, first_name...)\n");
    return;
  }
  res.cookie(SESSION_COOKIE, encodeURIComponent(JSON.stringify(user)), {
    httpOnly: true,
    sameSite: "lax",
    path: "/",
    encode: String, // already encoded
  });
  res.redirect(303, "/");
});

// Reditus' script URL for the page (a tiny script, so the page itself stays static).
app.get("/reditus-config.js", (req, res) => {
  const config = { scriptUrl: REDITUS_SCRIPT_URL, customerId: REDITUS_CUSTOMER_ID };
  res
    .type("text/javascript")
    .set("Cache-Control", "no-store")
    .send(`window.REDITUS_CONFIG = ${JSON.stringify(config)};\n`);
});

// What the page needs about the signed-in user for the widget's user_details.
app.get("/api/me", requireUser, (req, res) => {
  res.set("Cache-Control", "no-store").json(req.user);
});

app.get("/api/reditus-token", requireUser, async (req, res) => {
  try {
    // Reditus types the user id as a string: send it as one.
    const { token, productId } = await fetchReditusToken(String(req.user.id));
    // The product id goes along: the page passes it to gr("loadReferralWidget").
    res.set("Cache-Control", "no-store").json({ token, productId });
  } catch (err) {
    if (!(err instanceof SidecarError)) throw err;
    console.error(err.message);
    if (err.status === 503) {
      // No secret loaded yet (pod starting, Vault down): ask the widget to retry.
      if (err.retryAfter) res.set("Retry-After", err.retryAfter);
      res.status(503).json({ error: "token temporarily unavailable" });
    } else {
      res.status(502).json({ error: "token unavailable" });
    }
  }
});

// The referral page: ../public/index.html and ../public/referral.js.
app.use(express.static(PUBLIC_DIR));

if (process.argv[1] && import.meta.url === new URL(`file://${process.argv[1]}`).href) {
  app.listen(PORT, HOST, () => {
    console.log(`listening on http://${HOST}:${PORT}`);
  });
}
