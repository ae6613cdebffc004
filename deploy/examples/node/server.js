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

import express from "express";

const SIDECAR_URL = process.env.REDITUS_SIDECAR_URL ?? "http://127.0.0.1:8787";
const HOST = process.env.HOST ?? "127.0.0.1";
const PORT = Number(process.env.PORT ?? 3000);

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

// Stand-in for your session middleware: in your app req.user comes from your login.
function requireUser(req, res, next) {
  const id = req.get("X-Example-User");
  if (!id) {
    res.status(401).json({ error: "not signed in" });
    return;
  }
  req.user = { id };
  next();
}

export const app = express();

app.get("/api/reditus-token", requireUser, async (req, res) => {
  try {
    // Reditus types the user id as a string: send it as one.
    const { token } = await fetchReditusToken(String(req.user.id));
    res.set("Cache-Control", "no-store").json({ token });
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

if (process.argv[1] && import.meta.url === new URL(`file://${process.argv[1]}`).href) {
  app.listen(PORT, HOST, () => {
    console.log(`listening on http://${HOST}:${PORT}`);
  });
}
