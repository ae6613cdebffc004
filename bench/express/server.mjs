// The Reditus guide's own route: Express + jose, signing in the app's backend.
// The baseline the sidecar is compared with (bench/run.py starts it on loopback).
//   PORT=8788 PRODUCT_ID=p PRODUCT_SECRET=s node server.mjs
import express from "express";
import { SignJWT } from "jose";

const port = Number(process.env.PORT || 8788);
const productId = process.env.PRODUCT_ID;
const key = new TextEncoder().encode(process.env.PRODUCT_SECRET);

const app = express();
app.disable("x-powered-by");
app.use(express.json({ limit: "16kb" }));

app.post("/v1/token", async (req, res) => {
  // The same request guard the sidecar applies, so both do comparable work.
  if ((req.get("X-Sidecar-Request") || "").toLowerCase() !== "true") {
    return res.status(403).json({ error: { code: "missing_request_header" } });
  }
  const userId = req.body && req.body.userId;
  if (typeof userId !== "string" || userId.length === 0) {
    return res.status(400).json({ error: { code: "invalid_request" } });
  }
  const iat = Math.floor(Date.now() / 1000);
  const token = await new SignJWT({ ProductId: productId, UserId: userId, iat })
    .setProtectedHeader({ alg: "HS512", typ: "JWT" })
    .sign(key);
  res.set("Cache-Control", "no-store").json({ token, productId, issuedAt: iat });
});

app.listen(port, "127.0.0.1", () => console.log(`listening on 127.0.0.1:${port}`));
