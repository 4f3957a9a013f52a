package io.sessionmesh.tomcat;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import java.io.EOFException;
import java.io.IOException;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.function.BooleanSupplier;
import org.junit.Test;

/** The change stream: its parser on whole and split input, its refusals,
 *  and the connection's epochs against a stand-in server on loopback. */
public class ChangeStreamTest {
    private static final String HEAD =
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n";

    private static String chunk(String data) {
        return Integer.toHexString(data.length()) + "\r\n" + data + "\r\n";
    }

    private static List<String> parse(ChangeStream.Parser p, String input, int step) throws IOException {
        List<String> out = new ArrayList<>();
        byte[] b = input.getBytes(StandardCharsets.ISO_8859_1);
        for (int i = 0; i < b.length; i += step) {
            p.feed(b, i, Math.min(step, b.length - i), (id, tag) -> out.add(tag + " " + id));
        }
        return out;
    }

    @Test
    public void linesAreTheSameWhateverTheReadsSplitAndReadyIsSeen() throws IOException {
        String stream = HEAD + chunk("ready 12\n") + chunk("\"00000000000000ab\" A1\n- B2\n") + chunk("\"01\" C3.node1\n");
        List<String> whole = parse(new ChangeStream.Parser(), stream, stream.length());
        assertEquals(List.of("\"00000000000000ab\" A1", "- B2", "\"01\" C3.node1"), whole);
        for (int step = 1; step < 9; step++) {
            ChangeStream.Parser p = new ChangeStream.Parser();
            assertEquals("split every " + step, whole, parse(p, stream, step));
            assertTrue(p.isReady());
            assertEquals(12, p.watcher());
        }
        ChangeStream.Parser p = new ChangeStream.Parser();
        parse(p, HEAD, 1);
        assertFalse("not ready before its line", p.isReady());
    }

    @Test
    public void whatIsNotTheStreamIsRefusedWithAReason() {
        String[][] bad = {
            {"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", "404"},
            {"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", "not chunked"},
            {HEAD + "zz\r\n", "chunk size"},
            {HEAD + "123456789\r\n", "chunk size"},
            {HEAD + "4\r\nready\n\r\n", "no line end"},
            {HEAD + chunk("what is this\n"), "line"},
            {HEAD + chunk("ready x\n"), "line"},
            {HEAD + chunk("\"01\" a/b\n"), "line"},
            {HEAD + chunk("x".repeat(2000)), "too long"},
            {"HTTP/1.1 200 OK\r\n" + "X: " + "y".repeat(20000), "too long"},
        };
        for (String[] c : bad) {
            IOException e = assertThrows(c[0], IOException.class, () -> parse(new ChangeStream.Parser(), c[0], 7));
            assertTrue(e.getMessage(), e.getMessage().contains(c[1]));
        }
        assertThrows(EOFException.class, () -> parse(new ChangeStream.Parser(), HEAD + "0\r\n\r\n", 3));
    }

    private static void await(BooleanSupplier cond, String what) throws InterruptedException {
        long deadline = System.nanoTime() + 10_000_000_000L;
        while (!cond.getAsBoolean()) {
            if (System.nanoTime() > deadline) {
                throw new AssertionError("timed out waiting for " + what);
            }
            Thread.sleep(5);
        }
    }

    @Test
    public void eachStartAndEndOfTheStreamIsANewEpochAndItReconnects() throws Exception {
        List<String> lines = new CopyOnWriteArrayList<>();
        try (ServerSocket server = new ServerSocket(0, 10, InetAddress.getLoopbackAddress())) {
            ChangeStream cs = new ChangeStream("127.0.0.1", server.getLocalPort(), "tok", 2000,
                (id, tag) -> lines.add(tag + " " + id), "-test", null);
            cs.start();
            try {
                long before = cs.epoch();
                try (Socket s = server.accept()) {
                    byte[] req = new byte[4096];
                    int n = s.getInputStream().read(req);
                    String r = new String(req, 0, n, StandardCharsets.ISO_8859_1);
                    assertTrue(r, r.startsWith("GET /v1/changes HTTP/1.1\r\n"));
                    assertTrue(r, r.contains("Authorization: Bearer tok\r\n"));
                    OutputStream out = s.getOutputStream();
                    out.write((HEAD + chunk("ready\n")).getBytes(StandardCharsets.ISO_8859_1));
                    out.flush();
                    await(cs::connected, "ready");
                    long up = cs.epoch();
                    assertTrue(up > before);
                    out.write(chunk("- X1\n").getBytes(StandardCharsets.ISO_8859_1));
                    out.flush();
                    await(() -> lines.contains("- X1"), "a line");
                    assertEquals(up, cs.epoch());
                }
                await(() -> !cs.connected(), "the end of the stream");
                long down = cs.epoch();
                try (Socket s = server.accept()) {
                    s.getInputStream().read(new byte[4096]);
                    s.getOutputStream().write((HEAD + chunk("ready\n")).getBytes(StandardCharsets.ISO_8859_1));
                    await(cs::connected, "the stream again");
                    assertTrue(cs.epoch() > down);
                }
            } finally {
                cs.stop();
            }
        }
    }
}
