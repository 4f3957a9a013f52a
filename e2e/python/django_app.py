"""Django cache-backed sessions on Django's RedisCache, pointed at the sidecar."""
import os
import sys

import django
from django.conf import settings
from django.http import JsonResponse
from django.urls import path

NODE = os.environ["NODE_NAME"]
settings.configure(
    DEBUG=False,
    SECRET_KEY="e2e-secret",
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware"],
    INSTALLED_APPS=["django.contrib.sessions"],
    SESSION_ENGINE="django.contrib.sessions.backends.cache",
    SESSION_COOKIE_AGE=int(os.environ.get("SESSION_TTL", "1800")),
    CACHES={
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{os.environ['REDIS_PORT']}",
        }
    },
    DATABASES={},
)


def login(request):
    request.session["user"] = request.GET["user"]
    request.session["visits"] = 0
    return JsonResponse({"user": request.session["user"], "node": NODE})


def whoami(request):
    if "user" not in request.session:
        return JsonResponse({"user": None, "node": NODE}, status=401)
    request.session["visits"] = request.session.get("visits", 0) + 1
    return JsonResponse({"user": request.session["user"], "visits": request.session["visits"], "node": NODE})


def health(request):
    from django.core.cache import cache

    try:
        cache.get("health-probe")
        return JsonResponse({"ok": True, "node": NODE})
    except Exception as e:  # the sidecar answers LOADING until ready
        return JsonResponse({"ok": False, "error": str(e)}, status=503)


urlpatterns = [path("login", login), path("whoami", whoami), path("health", health)]

if __name__ == "__main__":
    django.setup()
    from django.core.management import execute_from_command_line

    print("starting", flush=True)
    execute_from_command_line([sys.argv[0], "runserver", f"127.0.0.1:{os.environ['PORT']}", "--noreload", "--skip-checks"])
