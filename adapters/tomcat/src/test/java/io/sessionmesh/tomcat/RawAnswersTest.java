package io.sessionmesh.tomcat;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import java.io.IOException;
import java.io.InputStream;
import java.net.InetAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.List;
import java.util.concurrent.atomic.AtomicInteger;
import org.junit.After;
import org.junit.Test;

/** The client against hand-written answers: keep-alive, chunked bodies,
 *  connections the sidecar closed, and answers that must be refused before
 *  anything is allocated. */
public class RawAnswersTest {
    private ServerSocket server;
    private Thread thread;
    private final AtomicInteger connections = new AtomicInteger();

    /** Serves each accepted connection the next list of answers, one per request, then closes it. */
    private SidecarClient serve(List<List<String>> perConnection) throws IOException {
        server = new ServerSocket(0, 50, InetAddress.getLoopbackAddress());
        thread = new Thread(() -> {
            for (List<String> answers : perConnection) {
                try (Socket s = server.accept()) {
                    connections.incrementAndGet();
                    InputStream in = s.getInputStream();
                    for (String a : answers) {
                        readRequest(in);
                        s.getOutputStream().write(a.getBytes(StandardCharsets.ISO_8859_1));
                        s.getOutputStream().flush();
                    }
                } catch (IOException e) {
                    return;
                }
            }
        });
        thread.setDaemon(true);
        thread.start();
        return new SidecarClient("http://127.0.0.1:" + server.getLocalPort(), null, Duration.ofSeconds(2));
    }

    /** Reads one request: headers, then Content-Length bytes. */
    private static void readRequest(InputStream in) throws IOException {
        StringBuilder h = new StringBuilder();
        while (!h.toString().endsWith("\r\n\r\n")) {
            int c = in.read();
            if (c < 0) {
                throw new IOException("closed");
            }
            h.append((char) c);
        }
        for (String line : h.toString().split("\r\n")) {
            if (line.toLowerCase().startsWith("content-length:")) {
                in.readNBytes(Integer.parseInt(line.substring(15).trim()));
            }
        }
    }

    @After
    public void stop() throws IOException {
        if (server != null) {
            server.close();
        }
    }

    private static final String NO_CONTENT = "HTTP/1.1 204 No Content\r\n\r\n";

    @Test
    public void oneConnectionServesManyCalls() throws IOException {
        SidecarClient c = serve(List.of(List.of(NO_CONTENT, NO_CONTENT, NO_CONTENT)));
        for (int i = 0; i < 3; i++) {
            c.touch("A");
        }
        assertEquals(1, connections.get());
    }

    @Test
    public void aConnectionTheSidecarClosedIsRetriedOnANewOne() throws IOException {
        // The first connection answers once and is closed by the server.
        SidecarClient c = serve(List.of(List.of(NO_CONTENT), List.of(NO_CONTENT)));
        c.touch("A");
        c.touch("A");
        assertEquals(2, connections.get());
    }

    @Test
    public void chunkedAnswersAreRead() throws IOException {
        String body = "{\"id\":\"A\",\"createdMs\":3,\"maxInactiveSeconds\":9,\"attributes\":{}}";
        String chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nETag: \"v1\"\r\n\r\n"
            + "5\r\n" + body.substring(0, 5) + "\r\n"
            + Integer.toHexString(body.length() - 5) + ";ext=1\r\n" + body.substring(5) + "\r\n0\r\n\r\n";
        SidecarClient c = serve(List.of(List.of(chunked, "HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n")));
        SidecarClient.Lookup l = c.lookup("A", false, null);
        assertEquals(9, l.session.maxInactiveSeconds);
        assertEquals("\"v1\"", l.etag);
        assertEquals(304, c.lookup("A", false, "\"v1\"").status);
        assertEquals(1, connections.get());
    }

    @Test
    public void oversizedAndMalformedAnswersAreRefusals() throws IOException {
        SidecarClient c = serve(List.of(
            List.of("HTTP/1.1 200 OK\r\nContent-Length: 999999999999\r\n\r\n"),
            List.of("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7fffffff\r\n"),
            List.of("SMTP ready\r\n\r\n"),
            List.of("HTTP/1.1 200 OK\r\nContent-Length: -4\r\n\r\n"),
            List.of("HTTP/1.1 200 OK\r\n" + "X: y\r\n".repeat(200) + "\r\n"),
            List.of("HTTP/1.1 200 OK\r\nX: " + "y".repeat(10_000) + "\r\n\r\n"),
            List.of("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}")));
        for (int i = 0; i < 6; i++) {
            SidecarClient.Refused e = assertThrows(SidecarClient.Refused.class, () -> c.lookup("A", false, null));
            assertTrue(e.getMessage(), e.getMessage().length() < 300);
        }
        IOException cut = assertThrows(IOException.class, () -> c.lookup("A", false, null));
        assertTrue(cut.getMessage(), cut.getMessage().contains("ended early"));
    }
}
