package io.sessionmesh.tomcat;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertThrows;

import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.junit.Test;

public class JsonTest {
    @Test
    public void parsesWhatTheSidecarAnswers() {
        Object v = Json.parse(" {\"id\":\"a.b\",\"n\":-12,\"x\":1.5e3,\"ok\":true,\"no\":false,"
            + "\"nil\":null,\"l\":[1,\"two\",{}],\"s\":\"q\\\"\\\\\\/\\n\\t\\u00e9\\ud83d\\ude00\"} ");
        @SuppressWarnings("unchecked")
        Map<String, Object> m = (Map<String, Object>) v;
        assertEquals("a.b", m.get("id"));
        assertEquals(-12L, m.get("n"));
        assertEquals(1500.0, m.get("x"));
        assertEquals(Boolean.TRUE, m.get("ok"));
        assertEquals(Boolean.FALSE, m.get("no"));
        assertNull(m.get("nil"));
        assertEquals(List.of(1L, "two", Map.of()), m.get("l"));
        assertEquals("q\"\\/\n\té\uD83D\uDE00", m.get("s"));
    }

    @Test
    public void malformedAnswersAreIllegalArgumentsNeverOtherErrors() {
        String[] bad = {"", "{", "[1,", "{\"a\" 1}", "{\"a\":1,}", "[1]x", "tru", "nul", "\"abc",
            "\"\\x\"", "\"\\u12\"", "\"\\u+123\"", "\"\\u-123\"", "1-2", "-", "{1:2}", "\"a\u0001b\"",
            "[".repeat(100_000), "{\"a\":".repeat(100_000), "99999999999999999999999"};
        for (String s : bad) {
            assertThrows(s.length() > 40 ? s.substring(0, 40) : s, IllegalArgumentException.class,
                () -> Json.parse(s));
        }
    }

    @Test
    public void quotesRoundTrip() {
        String tricky = "a\"b\\c\n\u0000\u001f/é\uD83D\uDE00";
        assertEquals(tricky, Json.parse(Json.quote(tricky)));
        Map<String, byte[]> attrs = new LinkedHashMap<>();
        attrs.put("user", new byte[] {(byte) 0xac, (byte) 0xed, 0, 5});
        attrs.put("x\"y", new byte[0]);
        RemoteSession r = RemoteSession.fromJson("{\"id\":\"s1\",\"createdMs\":5,\"lastAccessedMs\":7,"
            + "\"maxInactiveSeconds\":60,\"expiresAtMs\":60007,\"attributes\":" + Json.attributes(attrs) + "}");
        assertEquals("s1", r.id);
        assertEquals(5L, r.createdMs);
        assertEquals(60, r.maxInactiveSeconds);
        assertArrayEquals(attrs.get("user"), r.attributes.get("user"));
        assertArrayEquals(new byte[0], r.attributes.get("x\"y"));
    }

    @Test
    public void aSessionWithBadBase64IsAnIllegalArgument() {
        assertThrows(IllegalArgumentException.class,
            () -> RemoteSession.fromJson("{\"id\":\"s\",\"attributes\":{\"a\":\"%%%\"}}"));
        assertThrows(IllegalArgumentException.class, () -> RemoteSession.fromJson("[]"));
    }
}
