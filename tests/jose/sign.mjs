// The Reditus guide's signer, verbatim in shape: reads one JSON job per line on stdin
// ({secret, productId, userId, iat, exp?}) and prints one token per line.
import { SignJWT } from "jose";
import { createInterface } from "node:readline";

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (!line.trim()) continue;
  const job = JSON.parse(line);
  const key = new TextEncoder().encode(job.secret);
  let jwt = new SignJWT({ ProductId: job.productId, UserId: job.userId, iat: job.iat })
    .setProtectedHeader({ alg: "HS512", typ: "JWT" });
  if (job.exp !== undefined) jwt = jwt.setExpirationTime(job.exp);
  process.stdout.write((await jwt.sign(key)) + "\n");
}
