package io.sessionmesh.tomcat;

import java.io.IOException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;
import java.util.Collection;
import java.util.Map;
import java.util.Optional;
import java.util.regex.Pattern;

/** The sidecar's local HTTP API over one keep-alive HttpClient (HTTP/1.1 on
 *  loopback). Transport failures are IOExceptions (the sidecar is
 *  unreachable); unexpected answers are SidecarClient.Refused. */
final class SidecarClient {
    /** The sidecar answered, but not as hoped. */
    static final class Refused extends IOException {
        private static final long serialVersionUID = 1L;
        final int status;

        Refused(int status, String body) {
            super(status == 0 ? body : "sidecar answered " + status + ": " + body);
            this.status = status;
        }
    }

    /** Session ids sent to the sidecar: characters that need no escaping in
     *  a URI path and that the sidecar accepts; anything else (a forged
     *  cookie with '/', '?', '%' or spaces) is no session. */
    private static final Pattern ID = Pattern.compile("[A-Za-z0-9._~!$&'()*+,;=:@-]{1,300}");

    static boolean validId(String id) {
        return id != null && ID.matcher(id).matches();
    }

    private final HttpClient http;
    private final String base;
    private final String token;
    private final Duration timeout;

    SidecarClient(String base, String token, Duration timeout) {
        this.base = base.endsWith("/") ? base.substring(0, base.length() - 1) : base;
        this.token = token;
        this.timeout = timeout;
        this.http = HttpClient.newBuilder()
            .version(HttpClient.Version.HTTP_1_1)
            .connectTimeout(timeout)
            .build();
    }

    private HttpRequest.Builder req(String path) {
        HttpRequest.Builder b = HttpRequest.newBuilder(URI.create(base + path)).timeout(timeout);
        if (token != null && !token.isEmpty()) {
            b.header("Authorization", "Bearer " + token);
        }
        return b;
    }

    private HttpResponse<String> send(HttpRequest r) throws IOException {
        try {
            return http.send(r, HttpResponse.BodyHandlers.ofString());
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new IOException("interrupted", e);
        }
    }

    private static HttpRequest.BodyPublisher json(String body) {
        return HttpRequest.BodyPublishers.ofString(body);
    }

    private static String path(String id) throws Refused {
        if (!validId(id)) {
            throw new Refused(0, "not a session id the sidecar accepts");
        }
        return "/v1/sessions/" + id;
    }

    /** The session, or empty when it does not exist, expired or was invalidated. */
    Optional<RemoteSession> get(String id, boolean touch) throws IOException {
        return Optional.ofNullable(lookup(id, touch).session);
    }

    /** What the sidecar knows of a session: 200 with its copy, 404 (unknown
     *  or expired), or 410 (invalidated: final). */
    static final class Lookup {
        final int status;
        final RemoteSession session;

        Lookup(int status, RemoteSession session) {
            this.status = status;
            this.session = session;
        }
    }

    Lookup lookup(String id, boolean touch) throws IOException {
        HttpResponse<String> r = send(req(path(id) + (touch ? "" : "?touch=false")).GET().build());
        if (r.statusCode() == 404 || r.statusCode() == 410) {
            return new Lookup(r.statusCode(), null);
        }
        if (r.statusCode() != 200) {
            throw new Refused(r.statusCode(), r.body());
        }
        try {
            return new Lookup(200, RemoteSession.fromJson(r.body()));
        } catch (IllegalArgumentException e) {
            throw new Refused(r.statusCode(), "a malformed session (" + e.getMessage() + ")");
        }
    }

    void create(String id, int maxInactiveSeconds, Map<String, byte[]> attributes) throws IOException {
        path(id);
        // Tomcat: 0 or less never expires; the sidecar: 0 never expires.
        String body = "{\"id\":" + Json.quote(id) + ",\"maxInactiveSeconds\":" + Math.max(0, maxInactiveSeconds)
            + ",\"attributes\":" + Json.attributes(attributes) + "}";
        HttpResponse<String> r = send(req("/v1/sessions").header("Content-Type", "application/json")
            .POST(json(body)).build());
        if (r.statusCode() != 201) {
            throw new Refused(r.statusCode(), r.body());
        }
    }

    /** Attribute changes as one atomic delta; also an access. */
    void patch(String id, Map<String, byte[]> set, Collection<String> remove, Integer maxInactiveSeconds)
        throws IOException {
        StringBuilder b = new StringBuilder("{\"set\":").append(Json.attributes(set)).append(",\"remove\":[");
        boolean first = true;
        for (String n : remove) {
            if (!first) {
                b.append(',');
            }
            first = false;
            b.append(Json.quote(n));
        }
        b.append(']');
        if (maxInactiveSeconds != null) {
            b.append(",\"maxInactiveSeconds\":").append(maxInactiveSeconds);
        }
        b.append('}');
        HttpResponse<String> r = send(req(path(id)).header("Content-Type", "application/json")
            .method("PATCH", json(b.toString())).build());
        if (r.statusCode() != 204) {
            throw new Refused(r.statusCode(), r.body());
        }
    }

    void touch(String id) throws IOException {
        HttpResponse<String> r = send(req(path(id) + "/touch").header("Content-Type", "application/json")
            .POST(HttpRequest.BodyPublishers.noBody()).build());
        if (r.statusCode() != 204 && r.statusCode() != 404 && r.statusCode() != 410) {
            throw new Refused(r.statusCode(), r.body());
        }
    }

    /** Invalidation, final on every member. */
    void delete(String id) throws IOException {
        HttpResponse<String> r = send(req(path(id)).DELETE().build());
        if (r.statusCode() != 204 && r.statusCode() != 404 && r.statusCode() != 410) {
            throw new Refused(r.statusCode(), r.body());
        }
    }

    /** Session-fixation protection: the session under a new id. */
    void rename(String id, String newId) throws IOException {
        path(newId);
        HttpResponse<String> r = send(req(path(id) + "/rename").header("Content-Type", "application/json")
            .POST(json("{\"newId\":" + Json.quote(newId) + "}")).build());
        if (r.statusCode() != 200) {
            throw new Refused(r.statusCode(), r.body());
        }
    }
}
