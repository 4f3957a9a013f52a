package io.sessionmesh.tomcat;

import java.io.BufferedInputStream;
import java.io.ByteArrayOutputStream;
import java.io.EOFException;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collection;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.concurrent.ConcurrentLinkedDeque;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.regex.Pattern;

/**
 * The sidecar's local HTTP API (plain HTTP/1.1 on loopback) over a pool of
 * kept-alive sockets. A small blocking client rather than
 * {@code java.net.http.HttpClient}: two calls per request (a read, a delta)
 * are the Manager's whole cost, and HttpClient spends several times more CPU
 * per call on its executor hand-offs (the bench in docs/tomcat.md).
 *
 * <p>Transport failures are IOExceptions (the sidecar is unreachable);
 * unexpected answers are {@link Refused}. Every length in an answer is checked
 * before anything is allocated.
 */
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

    /** An answer: status, ETag headers and body. */
    static final class Answer {
        final int status;
        final String etag;
        final String priorEtag;
        final byte[] body;
        final boolean keepAlive;

        Answer(int status, String etag, String priorEtag, byte[] body, boolean keepAlive) {
            this.status = status;
            this.etag = etag;
            this.priorEtag = priorEtag;
            this.body = body;
            this.keepAlive = keepAlive;
        }

        String text() {
            return new String(body, StandardCharsets.UTF_8);
        }
    }

    /** What the sidecar knows of a session: 200 with its copy, 304 (the copy
     *  named by If-None-Match is current), 404 (unknown or expired), or 410
     *  (invalidated: final). */
    static final class Lookup {
        final int status;
        final RemoteSession session;
        final String etag;

        Lookup(int status, RemoteSession session, String etag) {
            this.status = status;
            this.session = session;
            this.etag = etag;
        }
    }

    /** The versions a delta was applied to and produced (null: unknown). */
    static final class Written {
        final String prior;
        final String etag;

        Written(String prior, String etag) {
            this.prior = prior;
            this.etag = etag;
        }
    }

    /** Session ids sent to the sidecar: characters that need no escaping in
     *  a URI path and that the sidecar accepts; anything else (a forged
     *  cookie with '/', '?', '%' or spaces) is no session. */
    private static final Pattern ID = Pattern.compile("[A-Za-z0-9._~!$&'()*+,;=:@-]{1,300}");
    /** Larger answers are refused (the sidecar's own limit on a session is far lower). */
    static final int MAX_BODY = 64 << 20;
    private static final int MAX_LINE = 8192;
    private static final int MAX_HEADERS = 100;
    /** Idle connections kept for reuse. */
    private static final int MAX_IDLE = 64;

    /** 404 (unknown or expired) or 410 (invalidated). */
    static boolean gone(int status) {
        return status == 404 || status == 410;
    }

    static boolean validId(String id) {
        return id != null && ID.matcher(id).matches();
    }

    private final String host;
    private final int port;
    private final String hostHeader;
    private final String token;
    private final int timeoutMs;
    private final ConcurrentLinkedDeque<Conn> idle = new ConcurrentLinkedDeque<>();
    private final AtomicInteger idleCount = new AtomicInteger();

    SidecarClient(String base, String token, java.time.Duration timeout) {
        URI u = URI.create(base.endsWith("/") ? base.substring(0, base.length() - 1) : base);
        if (!"http".equals(u.getScheme()) || u.getHost() == null) {
            throw new IllegalArgumentException("the sidecar's API is plain HTTP on loopback: http://host:port, not "
                + base);
        }
        this.host = u.getHost();
        this.port = u.getPort() < 0 ? 80 : u.getPort();
        this.hostHeader = host + ":" + port;
        this.token = token;
        this.timeoutMs = (int) Math.max(1, Math.min(Integer.MAX_VALUE, timeout.toMillis()));
    }

    /** The change stream this node watches (0: none): named on writes, which
     *  the sidecar then does not echo back to it. */
    private volatile int watcher;

    void watcher(int id) {
        watcher = id;
    }

    String host() {
        return host;
    }

    int port() {
        return port;
    }

    /** Closes the idle connections (the Manager stops). */
    void close() {
        Conn c;
        while ((c = idle.pollFirst()) != null) {
            c.close();
        }
        idleCount.set(0);
    }

    private static final class Conn {
        final Socket socket;
        final InputStream in;
        final OutputStream out;

        Conn(Socket socket) throws IOException {
            this.socket = socket;
            this.in = new BufferedInputStream(socket.getInputStream(), 8192);
            this.out = socket.getOutputStream();
        }

        void close() {
            try {
                socket.close();
            } catch (IOException ignored) {
                // closing anyway
            }
        }
    }

    private Conn open() throws IOException {
        Socket s = new Socket();
        try {
            s.setTcpNoDelay(true);
            s.setSoTimeout(timeoutMs);
            s.connect(new InetSocketAddress(host, port), timeoutMs);
            return new Conn(s);
        } catch (IOException e) {
            s.close();
            throw e;
        }
    }

    private byte[] request(String method, String path, String ifNoneMatch, String body) {
        byte[] b = body == null ? new byte[0] : body.getBytes(StandardCharsets.UTF_8);
        StringBuilder h = new StringBuilder(160).append(method).append(' ').append(path)
            .append(" HTTP/1.1\r\nHost: ").append(hostHeader).append("\r\n");
        if (token != null && !token.isEmpty()) {
            h.append("Authorization: Bearer ").append(token).append("\r\n");
        }
        if (ifNoneMatch != null) {
            h.append("If-None-Match: ").append(ifNoneMatch).append("\r\n");
        }
        int w = watcher;
        if (w > 0 && !"GET".equals(method)) {
            h.append("Sessionmesh-Watcher: ").append(w).append("\r\n");
        }
        if (body != null) {
            h.append("Content-Type: application/json\r\n");
        }
        h.append("Content-Length: ").append(b.length).append("\r\n\r\n");
        byte[] head = h.toString().getBytes(StandardCharsets.ISO_8859_1);
        byte[] all = new byte[head.length + b.length];
        System.arraycopy(head, 0, all, 0, head.length);
        System.arraycopy(b, 0, all, head.length, b.length);
        return all;
    }

    /** One call. A kept-alive connection the sidecar has closed meanwhile
     *  fails before any answer arrives: the call is then made once more on a
     *  new connection. */
    Answer call(String method, String path, String ifNoneMatch, String body) throws IOException {
        byte[] req = request(method, path, ifNoneMatch, body);
        for (int attempt = 0; ; attempt++) {
            Conn c = idle.pollFirst();
            boolean reused = c != null;
            if (reused) {
                idleCount.decrementAndGet();
            } else {
                c = open();
            }
            boolean answered = false;
            try {
                c.out.write(req);
                c.out.flush();
                int first = c.in.read();
                if (first < 0) {
                    throw new EOFException("the sidecar closed the connection");
                }
                answered = true;
                Answer a = read(c.in, first, "HEAD".equals(method));
                if (a.keepAlive && idleCount.incrementAndGet() <= MAX_IDLE) {
                    idle.offerFirst(c);
                } else {
                    if (a.keepAlive) {
                        idleCount.decrementAndGet();
                    }
                    c.close();
                }
                return a;
            } catch (IOException | RuntimeException e) {
                c.close();
                if (reused && !answered && attempt == 0 && e instanceof IOException) {
                    continue;
                }
                throw e instanceof IOException ? (IOException) e : new Refused(0, "a malformed answer: " + e);
            }
        }
    }

    private static String line(InputStream in, int first) throws IOException {
        StringBuilder b = new StringBuilder(64);
        int c = first;
        while (true) {
            if (c < 0) {
                throw new EOFException("the answer ended early");
            }
            if (c == '\n') {
                int n = b.length();
                return n > 0 && b.charAt(n - 1) == '\r' ? b.substring(0, n - 1) : b.toString();
            }
            if (b.length() >= MAX_LINE) {
                throw new Refused(0, "an answer line longer than " + MAX_LINE + " bytes");
            }
            b.append((char) c);
            c = in.read();
        }
    }

    static Answer read(InputStream in, int first, boolean head) throws IOException {
        String status = line(in, first);
        if (!status.startsWith("HTTP/1.") || status.length() < 12 || status.charAt(8) != ' ') {
            throw new Refused(0, "not an HTTP answer");
        }
        int code;
        try {
            code = Integer.parseInt(status.substring(9, 12));
        } catch (NumberFormatException e) {
            throw new Refused(0, "not an HTTP status");
        }
        boolean keepAlive = status.startsWith("HTTP/1.1");
        long length = -1;
        boolean chunked = false;
        String etag = null;
        String prior = null;
        for (int n = 0; ; n++) {
            if (n > MAX_HEADERS) {
                throw new Refused(0, "more than " + MAX_HEADERS + " headers");
            }
            String h = line(in, in.read());
            if (h.isEmpty()) {
                break;
            }
            int colon = h.indexOf(':');
            if (colon <= 0) {
                throw new Refused(0, "a malformed header");
            }
            String name = h.substring(0, colon).trim().toLowerCase(Locale.ROOT);
            String value = h.substring(colon + 1).trim();
            switch (name) {
                case "content-length":
                    try {
                        length = Long.parseLong(value);
                    } catch (NumberFormatException e) {
                        throw new Refused(0, "a malformed Content-Length");
                    }
                    if (length < 0) {
                        throw new Refused(0, "a negative Content-Length");
                    }
                    break;
                case "transfer-encoding":
                    chunked = value.toLowerCase(Locale.ROOT).endsWith("chunked");
                    break;
                case "connection":
                    String v = value.toLowerCase(Locale.ROOT);
                    keepAlive = v.contains("close") ? false : (v.contains("keep-alive") || keepAlive);
                    break;
                case "etag":
                    etag = value;
                    break;
                case "sessionmesh-prior-etag":
                    prior = value;
                    break;
                default:
                    break;
            }
        }
        byte[] body;
        if (head || code == 204 || code == 304 || (code >= 100 && code < 200)) {
            body = new byte[0];
        } else if (chunked) {
            body = chunks(in);
        } else if (length >= 0) {
            if (length > MAX_BODY) {
                throw new Refused(code, "an answer of " + length + " bytes (at most " + MAX_BODY + ")");
            }
            body = in.readNBytes((int) length);
            if (body.length != length) {
                throw new EOFException("the answer ended early");
            }
        } else {
            // Delimited by the end of the connection.
            body = limited(in);
            keepAlive = false;
        }
        return new Answer(code, etag, prior, body, keepAlive);
    }

    private static byte[] chunks(InputStream in) throws IOException {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        while (true) {
            String size = line(in, in.read());
            int semi = size.indexOf(';');
            long n;
            try {
                n = Long.parseLong((semi < 0 ? size : size.substring(0, semi)).trim(), 16);
            } catch (NumberFormatException e) {
                throw new Refused(0, "a malformed chunk size");
            }
            if (n < 0 || out.size() + n > MAX_BODY) {
                throw new Refused(0, "an answer larger than " + MAX_BODY + " bytes");
            }
            if (n == 0) {
                while (!line(in, in.read()).isEmpty()) {
                    // trailers: ignored
                }
                return out.toByteArray();
            }
            byte[] c = in.readNBytes((int) n);
            if (c.length != n) {
                throw new EOFException("the answer ended early");
            }
            out.write(c);
            line(in, in.read());
        }
    }

    private static byte[] limited(InputStream in) throws IOException {
        byte[] b = in.readNBytes(MAX_BODY + 1);
        if (b.length > MAX_BODY) {
            throw new Refused(0, "an answer larger than " + MAX_BODY + " bytes");
        }
        return b;
    }

    private static String path(String id) throws Refused {
        if (!validId(id)) {
            throw new Refused(0, "not a session id the sidecar accepts");
        }
        return "/v1/sessions/" + id;
    }

    Lookup lookup(String id, boolean touch, String ifNoneMatch) throws IOException {
        Answer r = call("GET", path(id) + (touch ? "" : "?touch=false"), ifNoneMatch, null);
        if (r.status == 404 || r.status == 410 || r.status == 304) {
            return new Lookup(r.status, null, r.etag);
        }
        if (r.status != 200) {
            throw new Refused(r.status, r.text());
        }
        try {
            return new Lookup(200, RemoteSession.fromJson(r.text()), r.etag);
        } catch (IllegalArgumentException e) {
            throw new Refused(r.status, "a malformed session (" + e.getMessage() + ")");
        }
    }

    /** Creates the session; returns its version. */
    String create(String id, int maxInactiveSeconds, Map<String, byte[]> attributes) throws IOException {
        path(id);
        // Tomcat: 0 or less never expires; the sidecar: 0 never expires.
        String body = "{\"id\":" + Json.quote(id) + ",\"maxInactiveSeconds\":" + Math.max(0, maxInactiveSeconds)
            + ",\"attributes\":" + Json.attributes(attributes) + "}";
        Answer r = call("POST", "/v1/sessions", null, body);
        if (r.status != 201) {
            throw new Refused(r.status, r.text());
        }
        return r.etag;
    }

    /** One write on its own: a delta as one atomic {@code PATCH} (also an access), or a touch. */
    Written write(BatchWrite w) throws IOException {
        if (w.patch == null) {
            touch(w.id);
            return new Written(null, null);
        }
        Answer r = call("PATCH", path(w.id), null, w.patch);
        if (r.status != 204) {
            throw new Refused(r.status, r.text());
        }
        return new Written(r.priorEtag, r.etag);
    }

    /** A delta's JSON fields, from the opening brace on (the caller closes it). */
    private static void delta(StringBuilder b, Map<String, byte[]> set, Collection<String> remove,
                              Integer maxInactiveSeconds) {
        b.append("{\"set\":").append(Json.attributes(set)).append(",\"remove\":[");
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
    }

    /** One write of a batch: a delta, or (touch) an access only. */
    static final class BatchWrite {
        final String id;
        /** The body of the same write sent alone as a PATCH; null: a touch. */
        final String patch;

        private BatchWrite(String id, String patch) {
            this.id = id;
            this.patch = patch;
        }

        static BatchWrite patch(String id, Map<String, byte[]> set, Collection<String> remove,
                                Integer maxInactiveSeconds) throws Refused {
            path(id);
            StringBuilder b = new StringBuilder(64);
            delta(b, set, remove, maxInactiveSeconds);
            return new BatchWrite(id, b.append('}').toString());
        }

        static BatchWrite touch(String id) throws Refused {
            path(id);
            return new BatchWrite(id, null);
        }

        /** Characters the write adds to a batch. */
        int size() {
            return id.length() + (patch == null ? 24 : patch.length() + 8);
        }

        /** The write as one of {@code POST /v1/batch}'s {@code writes}. */
        void appendTo(StringBuilder b) {
            if (patch == null) {
                b.append("{\"op\":\"touch\",\"id\":").append(Json.quote(id)).append('}');
            } else {
                b.append(patch, 0, patch.length() - 1).append(",\"id\":").append(Json.quote(id)).append('}');
            }
        }
    }

    /** Whether the sidecar has {@code POST /v1/batch} (an older one answers 404: writes go one by one). */
    private volatile boolean batchUnsupported;

    /** Several sessions' writes in one request and one transaction of the
     *  sidecar; each succeeds or fails by itself. The result of each write,
     *  in order: its versions, or its refusal as a {@link Refused}. Transport
     *  failures throw, for the whole batch. */
    List<Object> batch(List<BatchWrite> writes) throws IOException {
        if (batchUnsupported) {
            return oneByOne(writes);
        }
        StringBuilder b = new StringBuilder(64 * writes.size() + 16).append("{\"writes\":[");
        for (int i = 0; i < writes.size(); i++) {
            if (i > 0) {
                b.append(',');
            }
            writes.get(i).appendTo(b);
        }
        Answer r = call("POST", "/v1/batch", null, b.append("]}").toString());
        // A batch's own answer is never 404 (a write's 404 is in its result):
        // this is a sidecar from before batches ("no_route").
        if (r.status == 404) {
            batchUnsupported = true;
            return oneByOne(writes);
        }
        if (r.status != 200) {
            throw new Refused(r.status, r.text());
        }
        return results(r.text(), writes);
    }

    @SuppressWarnings("unchecked")
    static List<Object> results(String body, List<BatchWrite> writes) throws Refused {
        int expected = writes.size();
        Object v;
        try {
            v = Json.parse(body);
        } catch (IllegalArgumentException e) {
            throw new Refused(0, "a malformed batch answer (" + e.getMessage() + ")");
        }
        Object rs = v instanceof Map ? ((Map<String, Object>) v).get("results") : null;
        if (!(rs instanceof List) || ((List<Object>) rs).size() != expected) {
            throw new Refused(0, "a batch answer without one result per write");
        }
        List<Object> out = new ArrayList<>(expected);
        for (int i = 0; i < expected; i++) {
            Object o = ((List<Object>) rs).get(i);
            Map<String, Object> m = o instanceof Map ? (Map<String, Object>) o : Map.of();
            int status = m.get("status") instanceof Number ? ((Number) m.get("status")).intValue() : 0;
            if (writes.get(i).patch == null && gone(status)) {
                out.add(new Written(null, null)); // as touch(): a session that is gone is no error
            } else if (status == 204) {
                Object prior = m.get("priorEtag");
                Object etag = m.get("etag");
                out.add(new Written(prior instanceof String ? (String) prior : null,
                    etag instanceof String ? (String) etag : null));
            } else {
                out.add(new Refused(status, String.valueOf(m.get("error")) + ": " + m.get("message")));
            }
        }
        return out;
    }

    /** The writes as single requests (a sidecar without batches). */
    private List<Object> oneByOne(List<BatchWrite> writes) throws IOException {
        List<Object> out = new ArrayList<>(writes.size());
        for (BatchWrite w : writes) {
            try {
                out.add(write(w));
            } catch (Refused e) {
                out.add(e);
            }
        }
        return out;
    }

    /** An access. A session that is gone (expired, or invalidated elsewhere)
     *  is no error: the next request finds it gone. */
    void touch(String id) throws IOException {
        Answer r = call("POST", path(id) + "/touch", null, "");
        if (r.status != 204 && !gone(r.status)) {
            throw new Refused(r.status, r.text());
        }
    }

    /** Invalidation, final on every member. */
    void delete(String id) throws IOException {
        Answer r = call("DELETE", path(id), null, null);
        if (r.status != 204 && !gone(r.status)) {
            throw new Refused(r.status, r.text());
        }
    }

    /** Session-fixation protection: the session under a new id. */
    void rename(String id, String newId) throws IOException {
        String p = path(id);
        path(newId);
        Answer r = call("POST", p + "/rename", null, "{\"newId\":" + Json.quote(newId) + "}");
        if (r.status != 200) {
            throw new Refused(r.status, r.text());
        }
    }
}
