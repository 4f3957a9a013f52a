"""Flask + Flask-Session on the sidecar's Redis endpoint (unchanged Redis config)."""
import os

import redis
from flask import Flask, jsonify, request, session
from flask_session import Session

r = redis.Redis(host="127.0.0.1", port=int(os.environ["REDIS_PORT"]))
app = Flask(__name__)
app.config.update(
    SECRET_KEY="e2e-secret",
    SESSION_TYPE="redis",
    SESSION_REDIS=r,
    SESSION_PERMANENT=True,
    PERMANENT_SESSION_LIFETIME=int(os.environ.get("SESSION_TTL", "1800")),
)
Session(app)
NODE = os.environ["NODE_NAME"]


@app.get("/login")
def login():
    session["user"] = request.args["user"]
    session["visits"] = 0
    return jsonify(user=session["user"], node=NODE)


@app.get("/whoami")
def whoami():
    if "user" not in session:
        return jsonify(user=None, node=NODE), 401
    session["visits"] = session.get("visits", 0) + 1
    return jsonify(user=session["user"], visits=session["visits"], node=NODE)


@app.get("/health")
def health():
    try:
        r.exists("health-probe")  # LOADING until the sidecar's state transfer is done
        return jsonify(ok=True, node=NODE)
    except redis.RedisError as e:
        return jsonify(ok=False, error=str(e)), 503


if __name__ == "__main__":
    print("starting", flush=True)
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]), threaded=True)
