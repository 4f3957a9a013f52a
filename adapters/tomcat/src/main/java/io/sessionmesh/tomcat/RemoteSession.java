package io.sessionmesh.tomcat;

import java.util.Base64;
import java.util.LinkedHashMap;
import java.util.Map;

/** A session as the sidecar returns it: attribute values are the bytes of
 *  Java serialization, opaque to the sidecar. */
final class RemoteSession {
    final String id;
    final long createdMs;
    final long lastAccessedMs;
    final int maxInactiveSeconds;
    final long expiresAtMs;
    final Map<String, byte[]> attributes;

    RemoteSession(String id, long createdMs, long lastAccessedMs, int maxInactiveSeconds,
                  long expiresAtMs, Map<String, byte[]> attributes) {
        this.id = id;
        this.createdMs = createdMs;
        this.lastAccessedMs = lastAccessedMs;
        this.maxInactiveSeconds = maxInactiveSeconds;
        this.expiresAtMs = expiresAtMs;
        this.attributes = attributes;
    }

    @SuppressWarnings("unchecked")
    static RemoteSession fromJson(String body) {
        Object v = Json.parse(body);
        if (!(v instanceof Map)) {
            throw new IllegalArgumentException("a session is a JSON object");
        }
        Map<String, Object> m = (Map<String, Object>) v;
        Map<String, byte[]> attrs = new LinkedHashMap<>();
        Object a = m.get("attributes");
        if (a instanceof Map) {
            for (Map.Entry<String, Object> e : ((Map<String, Object>) a).entrySet()) {
                attrs.put(e.getKey(), Base64.getDecoder().decode(String.valueOf(e.getValue())));
            }
        }
        return new RemoteSession(String.valueOf(m.get("id")), num(m, "createdMs"),
            num(m, "lastAccessedMs"), (int) num(m, "maxInactiveSeconds"), num(m, "expiresAtMs"), attrs);
    }

    private static long num(Map<String, Object> m, String k) {
        Object v = m.get(k);
        return v instanceof Number ? ((Number) v).longValue() : 0L;
    }
}
