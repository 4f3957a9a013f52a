package io.sessionmesh.tomcat;

import java.io.IOException;
import java.time.Duration;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicLong;
import java.util.regex.Pattern;
import org.apache.catalina.LifecycleException;
import org.apache.catalina.LifecycleState;
import org.apache.catalina.Session;
import org.apache.catalina.session.ManagerBase;
import org.apache.catalina.session.StandardSession;
import org.apache.juli.logging.Log;
import org.apache.juli.logging.LogFactory;

/**
 * A Tomcat session Manager backed by the sessionmesh sidecar: replaces
 * {@code <Cluster>} (no multicast, no receiver ports). Enable it in
 * context.xml:
 *
 * <pre>{@code <Manager className="io.sessionmesh.tomcat.SessionMeshManager" sidecar="http://127.0.0.1:7070"/>}</pre>
 *
 * <ul>
 * <li>A request is served from the local copy when the sidecar's change
 * stream ({@link ChangeStream}) shows it current; otherwise the copy is
 * checked with the sidecar first (a conditional GET). So a session that moved
 * away and back, or was invalidated elsewhere, is never served stale. Changes
 * go back as one delta of the attributes that changed.</li>
 * <li>If the sidecar is unreachable, the local copy serves (a warning, the
 * {@code degradedRequests} counter) and changes are sent when it returns.</li>
 * </ul>
 */
public class SessionMeshManager extends ManagerBase {
    private static final Log log = LogFactory.getLog(SessionMeshManager.class);

    /** Only attributes set with setAttribute are sent (like Spring Session's ON_SET_ATTRIBUTE). */
    public static final String ON_SET_ATTRIBUTE = "ON_SET_ATTRIBUTE";
    /** Attributes read during the request are sent too: they may have been changed in place. */
    public static final String ALWAYS = "ALWAYS";

    private String sidecar = envOr("SESSIONMESH_HTTP", "127.0.0.1:7070");
    private String saveMode = ON_SET_ATTRIBUTE;
    private String ignorePattern = ".*\\.(ico|png|gif|jpe?g|svg|webp|css|js|map|woff2?|ttf)$";
    private int timeoutMs = 2000;
    private boolean nearCache = true;
    private boolean groupCommit = true;

    private volatile SidecarClient client;
    private volatile Pattern ignore;
    private volatile boolean reachable = true;
    private final AtomicLong replicationErrors = new AtomicLong();
    private final AtomicLong degradedRequests = new AtomicLong();
    private final AtomicLong remoteReads = new AtomicLong();
    private final AtomicLong notModified = new AtomicLong();
    private final AtomicLong nearCacheHits = new AtomicLong();
    private volatile ChangeStream changes;
    private volatile GroupCommit commit;
    /** Sessions being read from the sidecar with no local copy yet: the last
     *  version the change stream named meanwhile ("" for none). */
    private final ConcurrentHashMap<String, String> inFlight = new ConcurrentHashMap<>();
    /** Sessions read from the sidecar during the current request, by requested id. */
    private final ThreadLocal<Map<String, Session>> fresh = new ThreadLocal<>();

    private static String envOr(String name, String dflt) {
        String v = System.getenv(name);
        return v == null || v.isEmpty() ? dflt : v;
    }

    // ---- configuration (attributes of <Manager>) ----

    public String getSidecar() {
        return sidecar;
    }

    public void setSidecar(String sidecar) {
        this.sidecar = sidecar;
    }

    public String getSaveMode() {
        return saveMode;
    }

    public void setSaveMode(String saveMode) {
        if (!ON_SET_ATTRIBUTE.equals(saveMode) && !ALWAYS.equals(saveMode)) {
            throw new IllegalArgumentException("saveMode must be ON_SET_ATTRIBUTE or ALWAYS, not " + saveMode);
        }
        this.saveMode = saveMode;
    }

    public String getIgnorePattern() {
        return ignorePattern;
    }

    public void setIgnorePattern(String ignorePattern) {
        this.ignorePattern = ignorePattern;
    }

    public int getTimeoutMs() {
        return timeoutMs;
    }

    public void setTimeoutMs(int timeoutMs) {
        this.timeoutMs = timeoutMs;
    }

    public boolean isNearCache() {
        return nearCache;
    }

    public void setNearCache(boolean nearCache) {
        this.nearCache = nearCache;
    }

    public boolean isGroupCommit() {
        return groupCommit;
    }

    /** Whether the writes of requests finishing together go to the sidecar
     *  as one batch (default true); false sends each on its own. */
    public void setGroupCommit(boolean groupCommit) {
        this.groupCommit = groupCommit;
    }

    // ---- counters (JMX, mbeans-descriptors.xml) ----

    /** Batches of writes sent (group commit). */
    public long getWriteBatches() {
        GroupCommit g = commit;
        return g == null ? 0 : g.batches();
    }

    /** Writes sent in batches: with {@link #getWriteBatches()}, the mean batch size. */
    public long getBatchedWrites() {
        GroupCommit g = commit;
        return g == null ? 0 : g.writes();
    }

    public long getNearCacheHits() {
        return nearCacheHits.get();
    }

    public boolean isChangeStreamConnected() {
        ChangeStream cs = changes;
        return cs != null && cs.connected();
    }

    public long getReplicationErrors() {
        return replicationErrors.get();
    }

    public long getDegradedRequests() {
        return degradedRequests.get();
    }

    public long getRemoteReads() {
        return remoteReads.get();
    }

    public long getNotModifiedReads() {
        return notModified.get();
    }

    public boolean isSidecarReachable() {
        return reachable;
    }

    @Override
    public String getName() {
        return "SessionMeshManager";
    }

    // ---- lifecycle ----

    @Override
    protected synchronized void startInternal() throws LifecycleException {
        super.startInternal();
        String base = sidecar.startsWith("http") ? sidecar : "http://" + sidecar;
        String token = System.getenv("SESSIONMESH_API_TOKEN");
        client = new SidecarClient(base, token, Duration.ofMillis(timeoutMs));
        SidecarClient c = client;
        commit = groupCommit ? new GroupCommit(c::batch, BATCH_MAX_WRITES, BATCH_MAX_CHARS) : null;
        if (nearCache) {
            String ctx = getContext().getName();
            changes = new ChangeStream(client.host(), client.port(), token, timeoutMs, this::changed,
                ctx == null || ctx.isEmpty() ? "" : "-" + ctx.replace('/', '-'), client);
            changes.start();
        }
        ignore = ignorePattern == null || ignorePattern.isEmpty() ? null : Pattern.compile(ignorePattern);
        getContext().getPipeline().addValve(new SessionMeshValve(this));
        String name = getContext().getName();
        log.info("sessionmesh: sessions of " + (name == null || name.isEmpty() ? "/ (ROOT)" : name)
            + " are kept by the sidecar at " + base
            + " (saveMode " + saveMode + ", nearCache " + nearCache + ", groupCommit " + groupCommit + ")");
        setState(LifecycleState.STARTING);
    }

    @Override
    protected synchronized void stopInternal() throws LifecycleException {
        setState(LifecycleState.STOPPING);
        // The other members go on serving these sessions: drop the local
        // copies, never invalidate them.
        for (Session s : findSessions()) {
            if (s instanceof StandardSession) {
                ((StandardSession) s).passivate();
            }
            sessions.remove(s.getIdInternal());
        }
        super.stopInternal();
        if (changes != null) {
            changes.stop();
            changes = null;
        }
        if (client != null) {
            client.close();
        }
    }

    /** Nothing to load: the sidecar holds the sessions. */
    @Override
    public void load() {
    }

    /** Nothing to save: the sidecar holds the sessions. */
    @Override
    public void unload() {
    }

    @Override
    protected StandardSession getNewSession() {
        return new SessionMeshSession(this);
    }

    boolean ignored(String uri) {
        return ignore != null && uri != null && ignore.matcher(uri).matches();
    }

    void beginRequest() {
        fresh.set(new HashMap<>());
    }

    void endRequest() {
        fresh.remove();
    }

    private void ok() {
        if (!reachable) {
            log.info("sessionmesh: the sidecar answers again");
        }
        reachable = true;
    }

    private void unreachable(String what, IOException e) {
        if (reachable) {
            log.warn("sessionmesh: the sidecar is unreachable (" + what + "): " + e
                + "; serving sessions from local memory until it returns");
        }
        reachable = false;
    }

    // ---- sessions ----

    @Override
    public Session createSession(String sessionId) {
        Session s = super.createSession(sessionId);
        SessionMeshSession sm = (SessionMeshSession) s;
        long epoch = prepareCheck(sm);
        try {
            sm.etag = client.create(s.getIdInternal(), s.getMaxInactiveInterval(), Map.of());
            sm.validEpoch = epoch;
            ok();
        } catch (SidecarClient.Refused e) {
            replicationErrors.incrementAndGet();
            log.warn("sessionmesh: the sidecar refused a new session: " + e.getMessage());
            sm.pendingCreate = true;
        } catch (IOException e) {
            unreachable("create", e);
            sm.pendingCreate = true;
        }
        Map<String, Session> f = fresh.get();
        if (f != null) {
            f.put(s.getIdInternal(), s);
        }
        return s;
    }

    /** A line of the change stream: the copy here (if any) is current only at that version. */
    private void changed(String id, String etag) {
        String b = base(id);
        inFlight.computeIfPresent(b, (k, v) -> etag);
        mark(sessions.get(b), etag);
        String route = getJvmRoute();
        if (route != null && !route.isEmpty()) {
            mark(sessions.get(b + "." + route), etag);
        }
    }

    private static void mark(Session s, String etag) {
        if (s instanceof SessionMeshSession) {
            ((SessionMeshSession) s).pushed = etag;
        }
    }

    /** Whether the copy here can be served without asking the sidecar: the
     *  change stream is up, the copy was checked in its current epoch, and no
     *  line has named another version since. A copy under another member's
     *  route (not yet rebound) is always checked. */
    private boolean current(SessionMeshSession s, String id, ChangeStream cs) {
        String route = getJvmRoute();
        boolean ours = id.indexOf('.') < 0 || route != null && id.endsWith("." + route);
        String tag = s.etag;
        String p = s.pushed;
        return ours && cs.connected() && tag != null && s.validEpoch == cs.epoch() && (p == null || p.equals(tag));
    }

    /** Before a new session is created in the sidecar: forgets the lines seen
     *  for it so far, and returns the epoch its version counts for (-1: none). */
    private long prepareCheck(SessionMeshSession s) {
        ChangeStream cs = changes;
        if (cs == null) {
            return -1;
        }
        synchronized (cs.lock()) {
            return restartLocked(cs, s);
        }
    }

    /** With the stream's lock held: applies what the stream has delivered,
     *  forgets the lines seen for {@code s} so far, and returns the epoch a
     *  version read from now on counts for. */
    private static long restartLocked(ChangeStream cs, SessionMeshSession s) {
        cs.drainLocked();
        if (s != null) {
            s.pushed = null;
        }
        return cs.epoch();
    }

    @Override
    public Session findSession(String id) throws IOException {
        if (!SidecarClient.validId(id)) {
            return null; // a forged cookie: never sent to the sidecar
        }
        Map<String, Session> f = fresh.get();
        if (f != null && f.containsKey(id)) {
            return f.get(id);
        }
        Session local = sessions.get(id);
        SessionMeshSession mine = local instanceof SessionMeshSession ? (SessionMeshSession) local : null;
        ChangeStream cs = changes;
        if (mine != null && cs != null && !mine.pendingCreate) {
            cs.drain();
            if (current(mine, id, cs)) {
                nearCacheHits.incrementAndGet();
                if (f != null) {
                    f.put(id, mine);
                }
                return mine;
            }
        }
        Session result = check(id, local, mine, cs);
        if (f != null) {
            f.put(id, result);
        }
        return result;
    }

    /** Reads the session from the sidecar (a conditional GET when the copy
     *  here has a version). */
    private Session check(String id, Session local, SessionMeshSession mine, ChangeStream cs) {
        String b = base(id);
        long epoch = -1;
        boolean registered = false;
        if (cs != null) {
            synchronized (cs.lock()) {
                epoch = restartLocked(cs, mine);
                registered = inFlight.putIfAbsent(b, "") == null;
            }
        }
        try {
            // A local copy at the sidecar's version is answered 304, no body.
            String known = mine != null && !mine.pendingCreate ? mine.etag : null;
            SidecarClient.Lookup l = client.lookup(id, false, known);
            ok();
            String seen = registered ? inFlight.remove(b) : null;
            registered = false;
            SessionMeshSession s;
            if (l.status == 304 && mine != null) {
                notModified.incrementAndGet();
                s = mine;
            } else if (l.session != null) {
                remoteReads.incrementAndGet();
                s = fromRemote(local, id, l.session);
                s.etag = l.etag;
            } else if (mine != null && mine.pendingCreate) {
                return local; // created here while the sidecar was away
            } else {
                // Invalidated on another member, or expired: not served from an old copy.
                if (local != null) {
                    sessions.remove(local.getIdInternal());
                }
                return null;
            }
            // Trusted from now on only if nothing else read it meanwhile.
            s.validEpoch = seen != null ? epoch : -1;
            if (seen != null && !seen.isEmpty()) {
                s.pushed = seen;
            }
            return s;
        } catch (SidecarClient.Refused e) {
            replicationErrors.incrementAndGet();
            log.warn("sessionmesh: reading a session failed: " + e.getMessage());
            return local;
        } catch (IOException e) {
            unreachable("read", e);
            degradedRequests.incrementAndGet();
            return local;
        } finally {
            if (registered) {
                inFlight.remove(b);
            }
        }
    }

    private SessionMeshSession fromRemote(Session local, String id, RemoteSession r) {
        SessionMeshSession s = local instanceof SessionMeshSession ? (SessionMeshSession) local : null;
        if (s == null) {
            s = (SessionMeshSession) createEmptySession();
            s.setNew(false);
            s.setValid(true);
            s.setCreationTime(r.createdMs);
            s.setMaxInactiveInterval(r.maxInactiveSeconds);
            s.setId(id, false); // adds it here; sessionCreated fired where it was created
            s.takeRemote(r, decode(r.attributes));
            s.activate(); // arrived on this node: sessionDidActivate, as after a restore
            return s;
        }
        s.takeRemote(r, decode(r.attributes));
        return s;
    }

    private Map<String, Object> decode(Map<String, byte[]> attrs) {
        ClassLoader cl = getContext().getLoader() != null ? getContext().getLoader().getClassLoader()
            : Thread.currentThread().getContextClassLoader();
        return Serialization.decode(attrs, cl, replicationErrors);
    }

    /** After a request: the session's changes to the sidecar, as one delta. */
    void flush(SessionMeshSession s) {
        if (!s.isValid()) {
            return;
        }
        synchronized (s.flushLock) {
            SessionMeshSession.Deltas d = s.take(ALWAYS.equals(saveMode));
            boolean creating = s.pendingCreate;
            if (creating) {
                d.set.addAll(s.names());
            }
            Map<String, byte[]> set = new LinkedHashMap<>();
            for (String n : d.set) {
                Object v = s.peek(n);
                byte[] bytes = v == null ? null : Serialization.encode(n, v, replicationErrors);
                if (bytes != null) {
                    set.put(n, bytes);
                }
            }
            String id = s.getIdInternal();
            try {
                if (creating) {
                    s.etag = client.create(id, s.getMaxInactiveInterval(), set);
                    s.pendingCreate = false;
                } else if (set.isEmpty() && d.removed.isEmpty() && !d.timeout) {
                    write(SidecarClient.BatchWrite.touch(id)); // keeps the version
                } else {
                    SidecarClient.Written w = write(SidecarClient.BatchWrite.patch(id, set, d.removed,
                        d.timeout ? Integer.valueOf(Math.max(0, s.getMaxInactiveInterval())) : null));
                    // The copy here is the new version only if the delta was applied
                    // to the version it was read at (no write from elsewhere between).
                    s.etag = w.prior != null && w.prior.equals(s.etag) ? w.etag : null;
                }
                ok();
            } catch (SidecarClient.Refused e) {
                replicationErrors.incrementAndGet();
                log.warn("sessionmesh: the sidecar refused a session's changes: " + e.getMessage());
            } catch (IOException e) {
                // Kept: sent by the next flush of this session once the sidecar is back.
                s.restore(d);
                unreachable("write", e);
            }
        }
    }

    /** Largest write (characters of JSON) that joins a batch; a larger one goes alone. */
    static final int BATCH_MAX_CHARS = 256 * 1024;
    /** Writes in one batch at most (the sidecar takes up to 256). */
    static final int BATCH_MAX_WRITES = 64;

    /** One session's write: with the other requests' writes under way
     *  (group commit), or alone as a PATCH (too large, or groupCommit off). */
    private SidecarClient.Written write(SidecarClient.BatchWrite w) throws IOException {
        GroupCommit g = commit;
        return g != null && w.size() <= BATCH_MAX_CHARS ? g.submit(w) : client.write(w);
    }

    /** How much later another node must have served a session for this
     *  node's idle copy to count as moved away (clocks of members differ a little). */
    static final long MOVED_SLACK_MS = 250;

    /** What to do with a local copy that has been idle here. */
    enum Copy { KEEP, MOVED, EXPIRED, INVALIDATED, UNKNOWN }

    boolean inRequest() {
        return fresh.get() != null;
    }

    /** Asks the sidecar about a copy idle here (background expiry check):
     *  expired there (this node, the last to serve it, fires sessionDestroyed),
     *  invalidated or served since by another node (dropped here without
     *  listeners: it lives on, or its end was announced where it happened). */
    Copy checkCopy(SessionMeshSession s) {
        try {
            SidecarClient.Lookup l = client.lookup(s.getIdInternal(), false, null);
            ok();
            if (l.status == 410) {
                return Copy.INVALIDATED;
            }
            if (l.session == null) {
                return Copy.EXPIRED;
            }
            if (l.session.lastAccessedMs > s.servedHereMs + MOVED_SLACK_MS && !s.hasDeltas()) {
                return Copy.MOVED;
            }
            s.takeTimes(l.session);
            return Copy.KEEP;
        } catch (IOException e) {
            unreachable("expiry check", e);
            return Copy.UNKNOWN;
        }
    }

    /** Drops a local copy without ending the session (sessionWillPassivate). */
    void dropCopy(SessionMeshSession s) {
        s.passivate();
        sessions.remove(s.getIdInternal());
    }

    /** An invalidation (or expiry) here: final on every member. */
    @Override
    public void remove(Session session, boolean update) {
        super.remove(session, update);
        // Called by expire() (invalidate, expiry), while the session is still
        // marked valid and expiring; also by an id change, which is no invalidation.
        if (!(session instanceof SessionMeshSession) || !((SessionMeshSession) session).isExpiring()
            || client == null) {
            return;
        }
        try {
            client.delete(session.getIdInternal());
            ok();
        } catch (IOException e) {
            replicationErrors.incrementAndGet();
            unreachable("invalidate", e);
        }
    }

    private static String base(String id) {
        int dot = id.indexOf('.');
        return dot < 0 ? id : id.substring(0, dot);
    }

    /** changeSessionId (session fixation protection) renames the session in the
     *  sidecar; a new jvmRoute suffix alone is the same session there. */
    @Override
    protected void changeSessionId(Session session, String newId, boolean notifySessionListeners,
                                   boolean notifyContainerListeners) {
        String old = session.getIdInternal();
        if (!base(old).equals(base(newId))) {
            try {
                client.rename(old, newId);
                ok();
                if (session instanceof SessionMeshSession) {
                    ((SessionMeshSession) session).etag = null;
                }
            } catch (IOException e) {
                replicationErrors.incrementAndGet();
                log.warn("sessionmesh: renaming a session in the sidecar failed: " + e);
            }
        }
        super.changeSessionId(session, newId, notifySessionListeners, notifyContainerListeners);
    }
}
