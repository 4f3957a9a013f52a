// express-session + connect-redis on the sidecar's Redis endpoint (unchanged Redis config).
const express = require("express");
const session = require("express-session");
const { RedisStore } = require("connect-redis");
const { createClient } = require("redis");

const node = process.env.NODE_NAME;
const client = createClient({ url: `redis://127.0.0.1:${process.env.REDIS_PORT}` });
client.on("error", () => {}); // reconnects by itself; /health reports the state

const app = express();
app.use(
  session({
    store: new RedisStore({ client, prefix: "sess:" }),
    secret: "e2e-secret",
    resave: false,
    saveUninitialized: false,
    cookie: { maxAge: Number(process.env.SESSION_TTL || 1800) * 1000 },
  }),
);

app.get("/login", (req, res) => {
  req.session.user = req.query.user;
  req.session.visits = 0;
  res.json({ user: req.session.user, node });
});

app.get("/whoami", (req, res) => {
  if (!req.session.user) return res.status(401).json({ user: null, node });
  req.session.visits = (req.session.visits || 0) + 1;
  res.json({ user: req.session.user, visits: req.session.visits, node });
});

app.get("/health", async (req, res) => {
  try {
    await client.exists("health-probe");
    res.json({ ok: true, node });
  } catch (e) {
    res.status(503).json({ ok: false, error: String(e) });
  }
});

client.connect().then(() => {
  app.listen(Number(process.env.PORT), "127.0.0.1", () => console.log("starting"));
});
