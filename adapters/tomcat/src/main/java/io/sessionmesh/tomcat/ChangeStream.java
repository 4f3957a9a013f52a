package io.sessionmesh.tomcat;

import java.io.EOFException;
import java.io.IOException;
import java.net.InetSocketAddress;
import java.nio.ByteBuffer;
import java.nio.channels.SocketChannel;
import java.nio.charset.StandardCharsets;
import java.util.Locale;
import org.apache.juli.logging.Log;
import org.apache.juli.logging.LogFactory;

/**
 * The sidecar's change stream ({@code GET /v1/changes}): a line for every
 * session that changes on any member, its version or {@code -} when it is
 * gone. The Manager serves a local copy without asking the sidecar only while
 * the stream is up and no line has named a version other than the copy's.
 *
 * <p>In sync mode the sidecar writes a change into this socket before the
 * write elsewhere is acknowledged, so a request that follows that write finds
 * the line in the socket: {@link #drain()} reads what is there, without
 * waiting, before a copy is trusted. A thread reads it every few milliseconds
 * meanwhile (so the sidecar never drops a slow reader) and reconnects when the
 * stream ends; each start and end of the stream is a new {@link #epoch()}, and
 * a copy checked in another epoch is checked again. The sidecar streams only
 * sessions this node has read or written, and not the writes that name this
 * stream ({@code Sessionmesh-Watcher}, sent by {@link SidecarClient}): with
 * sticky sessions the stream is nearly silent.
 */
final class ChangeStream implements Runnable {
    private static final Log log = LogFactory.getLog(ChangeStream.class);

    /** Where parsed lines go. */
    interface Sink {
        /** A session changed: its version now ({@code "..."}, as an ETag), or {@code -}: gone. */
        void changed(String id, String etag);
    }

    /** The HTTP answer, fed bytes as they arrive: the head, then chunks of lines. */
    static final class Parser {
        private enum State { HEAD, SIZE, DATA, DATA_END }

        static final int MAX_HEAD = 16384;
        static final int MAX_LINE = 1024;
        static final int MAX_CHUNK = 16 << 20;

        private State state = State.HEAD;
        private final StringBuilder text = new StringBuilder();
        private final byte[] line = new byte[MAX_LINE];
        private int lineLen;
        private long remaining;
        private boolean ready;
        private int watcher;

        boolean isReady() {
            return ready;
        }

        /** What the sidecar calls this stream ({@code ready <n>}; 0: not said). */
        int watcher() {
            return watcher;
        }

        void feed(byte[] b, int off, int len, Sink sink) throws IOException {
            for (int i = off; i < off + len; i++) {
                byte c = b[i];
                switch (state) {
                    case HEAD:
                        head(c);
                        break;
                    case SIZE:
                        size(c);
                        break;
                    case DATA:
                        data(c, sink);
                        break;
                    default:
                        if (c == '\n') {
                            state = State.SIZE;
                        } else if (c != '\r') {
                            throw new IOException("malformed change stream: no line end after a chunk");
                        }
                }
            }
        }

        private void head(byte c) throws IOException {
            text.append((char) (c & 0xff));
            if (text.length() > MAX_HEAD) {
                throw new IOException("the change stream's header is too long");
            }
            int n = text.length();
            if (n < 4 || text.charAt(n - 1) != '\n' || text.charAt(n - 2) != '\r'
                || text.charAt(n - 3) != '\n' || text.charAt(n - 4) != '\r') {
                return;
            }
            String h = text.toString();
            String status = h.substring(0, h.indexOf('\r'));
            if (!status.startsWith("HTTP/1.1 200")) {
                throw new IOException("the sidecar answered " + status + " to GET /v1/changes");
            }
            if (!h.toLowerCase(Locale.ROOT).contains("\r\ntransfer-encoding: chunked\r\n")) {
                throw new IOException("the change stream is not chunked");
            }
            text.setLength(0);
            state = State.SIZE;
        }

        private void size(byte c) throws IOException {
            if (c != '\n') {
                if (text.length() > 64) {
                    throw new IOException("malformed change stream: a chunk size line is too long");
                }
                text.append((char) (c & 0xff));
                return;
            }
            String s = text.toString().trim();
            text.setLength(0);
            int semi = s.indexOf(';');
            if (semi >= 0) {
                s = s.substring(0, semi).trim();
            }
            long n;
            try {
                n = s.isEmpty() || s.length() > 8 ? -1 : Long.parseLong(s, 16);
            } catch (NumberFormatException e) {
                n = -1;
            }
            if (n < 0 || n > MAX_CHUNK) {
                throw new IOException("malformed change stream: chunk size " + s);
            }
            if (n == 0) {
                throw new EOFException("the sidecar ended the change stream");
            }
            remaining = n;
            state = State.DATA;
        }

        private void data(byte c, Sink sink) throws IOException {
            if (--remaining == 0) {
                state = State.DATA_END;
            }
            if (c != '\n') {
                if (lineLen == MAX_LINE) {
                    throw new IOException("malformed change stream: a line is too long");
                }
                line[lineLen++] = c;
                return;
            }
            String l = new String(line, 0, lineLen, StandardCharsets.ISO_8859_1);
            lineLen = 0;
            if (l.equals("ready") || l.startsWith("ready ")) {
                try {
                    watcher = l.length() > 6 ? Integer.parseInt(l.substring(6)) : 0;
                } catch (NumberFormatException e) {
                    throw new IOException("malformed change stream line: " + l.substring(0, Math.min(l.length(), 12)));
                }
                ready = true;
                return;
            }
            int sp = l.indexOf(' ');
            String tag = sp > 0 ? l.substring(0, sp) : "";
            String id = sp > 0 ? l.substring(sp + 1) : "";
            boolean okTag = tag.equals("-") || tag.length() >= 2 && tag.charAt(0) == '"'
                && tag.charAt(tag.length() - 1) == '"';
            if (!okTag || !SidecarClient.validId(id)) {
                throw new IOException("malformed change stream line: " + l.substring(0, Math.min(l.length(), 12)));
            }
            sink.changed(id, tag);
        }
    }

    private final InetSocketAddress address;
    private final String request;
    private final int timeoutMs;
    private final Sink sink;
    private final String name;
    private final Object lock = new Object();
    private final ByteBuffer buf = ByteBuffer.allocate(64 * 1024);
    private final SidecarClient client;
    private SocketChannel channel; // guarded by lock
    private Parser parser; // guarded by lock
    private volatile boolean connected;
    private volatile long epoch;
    private volatile boolean running = true;
    private volatile String lastProblem;
    private Thread thread;

    /** How often the thread reads the stream when no request does. */
    static final long POLL_MS = 10;

    ChangeStream(String host, int port, String token, int timeoutMs, Sink sink, String name,
                 SidecarClient client) {
        this.address = new InetSocketAddress(host, port);
        this.request = "GET /v1/changes HTTP/1.1\r\nHost: " + host + ":" + port + "\r\n"
            + (token == null || token.isEmpty() ? "" : "Authorization: Bearer " + token + "\r\n") + "\r\n";
        this.timeoutMs = timeoutMs;
        this.sink = sink;
        this.name = name;
        this.client = client;
    }

    void start() {
        thread = new Thread(this, "sessionmesh-changes" + name);
        thread.setDaemon(true);
        thread.start();
    }

    void stop() {
        running = false;
        synchronized (lock) {
            closeLocked();
        }
        if (thread != null) {
            thread.interrupt();
            try {
                thread.join(2000);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }
    }

    /** Whether the stream is up (its {@code ready} line was read). */
    boolean connected() {
        return connected;
    }

    /** Changes at each start and end of the stream. */
    long epoch() {
        return epoch;
    }

    /** Held while lines are applied: a check of a copy that must not interleave with them takes it too. */
    Object lock() {
        return lock;
    }

    /** Reads and applies what is in the socket now, without waiting. */
    void drain() {
        synchronized (lock) {
            drainLocked();
        }
    }

    /** As {@link #drain()}, with the lock held by the caller. */
    void drainLocked() {
        if (channel == null) {
            return;
        }
        try {
            for (;;) {
                buf.clear();
                int n = channel.read(buf);
                if (n == 0) {
                    return;
                }
                if (n < 0) {
                    throw new EOFException("the sidecar closed the change stream");
                }
                parser.feed(buf.array(), 0, n, sink);
                if (!connected && parser.isReady()) {
                    connected = true;
                    epoch++;
                    if (client != null) {
                        client.watcher(parser.watcher());
                    }
                    log.info("sessionmesh: watching the sidecar's changes: current local copies are served without asking it");
                }
            }
        } catch (IOException e) {
            lostLocked(e);
        }
    }

    private void lostLocked(IOException e) {
        closeLocked();
        String p = String.valueOf(e.getMessage());
        if (connected || !p.equals(lastProblem)) {
            log.warn("sessionmesh: no change stream from the sidecar (" + p
                + "): every local copy is checked with the sidecar until it is back");
        }
        lastProblem = p;
        connected = false;
        epoch++;
        if (client != null) {
            client.watcher(0);
        }
    }

    private void closeLocked() {
        if (channel != null) {
            try {
                channel.close();
            } catch (IOException ignored) {
                // closing anyway
            }
            channel = null;
        }
    }

    private void connect() throws IOException {
        SocketChannel c = SocketChannel.open();
        try {
            c.socket().setTcpNoDelay(true);
            c.socket().connect(address, timeoutMs);
            ByteBuffer req = ByteBuffer.wrap(request.getBytes(StandardCharsets.ISO_8859_1));
            while (req.hasRemaining()) {
                c.write(req);
            }
            c.configureBlocking(false);
        } catch (IOException e) {
            c.close();
            throw e;
        }
        synchronized (lock) {
            closeLocked();
            channel = c;
            parser = new Parser();
        }
    }

    @Override
    public void run() {
        long backoffMs = 100;
        while (running) {
            boolean open;
            synchronized (lock) {
                open = channel != null;
            }
            try {
                if (!open) {
                    connect();
                }
                Thread.sleep(POLL_MS);
                drain();
                if (connected) {
                    backoffMs = 100;
                }
                synchronized (lock) {
                    open = channel != null;
                }
                if (open) {
                    continue;
                }
            } catch (IOException e) {
                synchronized (lock) {
                    lostLocked(e);
                }
            } catch (InterruptedException e) {
                return;
            }
            try {
                Thread.sleep(backoffMs);
            } catch (InterruptedException e) {
                return;
            }
            backoffMs = Math.min(5000, backoffMs * 2);
        }
    }
}
