package io.sessionmesh.tomcat;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CopyOnWriteArrayList;
import org.junit.After;
import org.junit.Before;
import org.junit.Test;

/** The wire format against a stand-in HTTP server on loopback (port 0). */
public class SidecarClientTest {
    private HttpServer server;
    private final List<String> seen = new CopyOnWriteArrayList<>();
    private final List<String> watchers = new CopyOnWriteArrayList<>();
    private volatile int status = 204;
    private volatile String answer = "";
    private SidecarClient client;

    @Before
    public void start() throws IOException {
        server = HttpServer.create(new InetSocketAddress("127.0.0.1", 0), 0);
        server.createContext("/", ex -> {
            String body = new String(ex.getRequestBody().readAllBytes(), StandardCharsets.UTF_8);
            watchers.add(ex.getRequestMethod() + " " + ex.getRequestHeaders().getFirst("Sessionmesh-Watcher"));
            seen.add(ex.getRequestMethod() + " " + ex.getRequestURI() + " "
                + ex.getRequestHeaders().getFirst("Authorization") + " " + body);
            byte[] out = answer.getBytes(StandardCharsets.UTF_8);
            ex.sendResponseHeaders(status, out.length == 0 ? -1 : out.length);
            if (out.length > 0) {
                ex.getResponseBody().write(out);
            }
            ex.close();
        });
        server.start();
        client = new SidecarClient("http://127.0.0.1:" + server.getAddress().getPort() + "/", "tok",
            Duration.ofSeconds(2));
    }

    @After
    public void stop() {
        server.stop(0);
    }

    @Test
    public void writesNameTheChangeStreamSoTheSidecarDoesNotEchoThem() throws IOException {
        client.write(SidecarClient.BatchWrite.patch("A", Map.of(), List.of(), null));
        client.watcher(7);
        client.write(SidecarClient.BatchWrite.patch("A", Map.of(), List.of(), null));
        status = 404;
        client.lookup("A", false, null);
        client.watcher(0);
        status = 204;
        client.delete("A");
        assertEquals(List.of("PATCH null", "PATCH 7", "GET null", "DELETE null"), watchers);
    }

    @Test
    public void aDeltaIsOnePatchOfTheChangedAttributes() throws IOException {
        SidecarClient.Written w =
            client.write(SidecarClient.BatchWrite.patch("ABC.node1", Map.of("user", new byte[] {1, 2, 3}), List.of("cart"), null));
        assertEquals(null, w.etag);
        assertEquals(List.of("PATCH /v1/sessions/ABC.node1 Bearer tok {\"set\":{\"user\":\"AQID\"},\"remove\":[\"cart\"]}"),
            seen);
    }

    @Test
    public void aTimeoutChangeIsSentAndNeverExpiringIsZero() throws IOException {
        client.write(SidecarClient.BatchWrite.patch("ABC", Map.of(), List.of(), 2));
        status = 201;
        client.create("DEF", -1, Map.of());
        assertEquals(List.of("PATCH /v1/sessions/ABC Bearer tok {\"set\":{},\"remove\":[],\"maxInactiveSeconds\":2}",
            "POST /v1/sessions Bearer tok {\"id\":\"DEF\",\"maxInactiveSeconds\":0,\"attributes\":{}}"), seen);
    }

    @Test
    public void aBatchIsOnePostWithOneResultPerWrite() throws IOException {
        status = 200;
        answer = "{\"results\":[{\"status\":204,\"etag\":\"\\\"e\\\"\",\"priorEtag\":\"\\\"p\\\"\"},"
            + "{\"status\":410,\"error\":\"invalidated\",\"message\":\"gone\"},"
            + "{\"status\":410,\"error\":\"invalidated\",\"message\":\"gone\"}]}";
        List<Object> r = client.batch(List.of(
            SidecarClient.BatchWrite.patch("A.node1", Map.of("n", new byte[] {7}), List.of("x"), 60),
            SidecarClient.BatchWrite.touch("B"), SidecarClient.BatchWrite.patch("C", Map.of(), List.of(), null)));
        assertEquals(List.of("POST /v1/batch Bearer tok {\"writes\":[{\"set\":{\"n\":\"Bw==\"},\"remove\":[\"x\"],"
            + "\"maxInactiveSeconds\":60,\"id\":\"A.node1\"},{\"op\":\"touch\",\"id\":\"B\"},"
            + "{\"set\":{},\"remove\":[],\"id\":\"C\"}]}"), seen);
        assertEquals("\"p\"", ((SidecarClient.Written) r.get(0)).prior);
        assertEquals("\"e\"", ((SidecarClient.Written) r.get(0)).etag);
        // A touch of a session that is gone is no error, as a single touch; a delta to it is refused.
        assertEquals(null, ((SidecarClient.Written) r.get(1)).etag);
        assertEquals(410, ((SidecarClient.Refused) r.get(2)).status);
        // Not one result per write, or not JSON: the whole batch is refused.
        answer = "{\"results\":[]}";
        assertThrows(SidecarClient.Refused.class, () -> client.batch(List.of(SidecarClient.BatchWrite.touch("B"))));
        answer = "{\"results\":";
        assertThrows(SidecarClient.Refused.class, () -> client.batch(List.of(SidecarClient.BatchWrite.touch("B"))));
        status = 400;
        answer = "{\"error\":\"bad_request\",\"message\":\"write 0: no\"}";
        assertEquals(400, assertThrows(SidecarClient.Refused.class,
            () -> client.batch(List.of(SidecarClient.BatchWrite.touch("B")))).status);
    }

    @Test
    public void aSidecarWithoutBatchesGetsTheWritesOneByOne() throws IOException {
        status = 404;
        answer = "{\"error\":\"no_route\",\"message\":\"no such endpoint: /v1/batch\"}";
        List<SidecarClient.BatchWrite> ws = List.of(
            SidecarClient.BatchWrite.patch("A", Map.of(), List.of("x"), null), SidecarClient.BatchWrite.touch("B"));
        List<Object> r = client.batch(ws);
        // The PATCH answered 404 (this stand-in answers 404 to all): refused alone; a touch of a gone session is no error.
        assertEquals(404, ((SidecarClient.Refused) r.get(0)).status);
        assertTrue(r.get(1) instanceof SidecarClient.Written);
        status = 204;
        client.batch(ws);
        assertEquals(List.of("POST /v1/batch", "PATCH /v1/sessions/A", "POST /v1/sessions/B/touch",
            "PATCH /v1/sessions/A", "POST /v1/sessions/B/touch"),
            seen.stream().map(l -> l.split(" ")[0] + " " + l.split(" ")[1]).collect(java.util.stream.Collectors.toList()));
    }

    @Test
    public void aMissingSessionIsEmptyAndAMalformedOneIsRefused() throws IOException {
        status = 404;
        assertNull(client.lookup("ABC", false, null).session);
        assertEquals("GET /v1/sessions/ABC?touch=false Bearer tok ", seen.get(0));
        status = 200;
        answer = "<html>proxy error</html>";
        SidecarClient.Refused e = assertThrows(SidecarClient.Refused.class, () -> client.lookup("ABC", false, null));
        assertEquals(200, e.status);
        answer = "{\"id\":\"ABC\",\"attributes\":{\"a\":\"not base64!\"}}";
        assertThrows(SidecarClient.Refused.class, () -> client.lookup("ABC", false, null));
        answer = "{\"id\":\"ABC\",\"createdMs\":1,\"maxInactiveSeconds\":60,\"attributes\":{\"a\":\"AQID\"}}";
        assertEquals(60, client.lookup("ABC", true, null).session.maxInactiveSeconds);
    }

    @Test
    public void aForgedSessionIdNeverReachesTheSidecar() {
        for (String id : new String[] {"../cluster", "a/b", "a?touch=true", "a#b", "a%2e", "a b", "", "é",
            "x".repeat(301)}) {
            assertFalse(id, SidecarClient.validId(id));
            assertThrows(id, SidecarClient.Refused.class, () -> client.lookup(id, false, null));
            assertThrows(id, SidecarClient.Refused.class, () -> client.delete(id));
            assertThrows(id, SidecarClient.Refused.class, () -> client.rename("ABC", id));
        }
        assertTrue(seen.isEmpty());
        assertTrue(SidecarClient.validId("0123456789ABCDEF0123456789ABCDEF.node-1_a"));
    }

    @Test
    public void anUnreachableSidecarIsAnIOExceptionNotARefusal() {
        server.stop(0);
        IOException e = assertThrows(IOException.class, () -> client.touch("ABC"));
        assertFalse(e instanceof SidecarClient.Refused);
    }
}
