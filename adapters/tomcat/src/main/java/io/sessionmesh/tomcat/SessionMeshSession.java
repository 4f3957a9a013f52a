package io.sessionmesh.tomcat;

import java.util.Map;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import org.apache.catalina.Manager;
import org.apache.catalina.session.StandardSession;

/** A StandardSession that records what a request changed, so that only the
 *  changed attributes are sent to the sidecar (per-attribute deltas). */
public class SessionMeshSession extends StandardSession {
    private static final long serialVersionUID = 1L;

    /** Attributes set (or replaced) since the last flush. */
    final transient Set<String> dirty = ConcurrentHashMap.newKeySet();
    /** Attributes removed since the last flush. */
    final transient Set<String> removed = ConcurrentHashMap.newKeySet();
    /** Attributes read since the last flush (saveMode ALWAYS sends them too:
     *  they may have been changed in place). */
    final transient Set<String> read = ConcurrentHashMap.newKeySet();
    /** Created while the sidecar was unreachable: created there at the next flush. */
    volatile transient boolean pendingCreate;
    /** Filled from the sidecar: no deltas, no listeners. */
    private transient boolean loading;
    /** setMaxInactiveInterval since the last flush: sent with the next delta. */
    volatile transient boolean timeoutDirty;
    /** The sidecar's version (ETag) this copy is known to match; null: unknown. */
    volatile transient String etag;
    /** The last version the change stream named for this session ({@code -}:
     *  gone), since the copy was last checked; null: none. */
    volatile transient String pushed;
    /** The change stream's epoch in which this copy was last checked (-1: never). */
    volatile transient long validEpoch = -1;
    /** When this node last served the session (0: never). */
    volatile transient long servedHereMs;

    public SessionMeshSession(Manager manager) {
        super(manager);
    }

    @Override
    public void setAttribute(String name, Object value, boolean notify) {
        super.setAttribute(name, value, notify);
        if (!loading && value != null) {
            dirty.add(name);
            removed.remove(name);
        }
    }

    @Override
    protected void removeAttributeInternal(String name, boolean notify) {
        super.removeAttributeInternal(name, notify);
        if (!loading) {
            removed.add(name);
            dirty.remove(name);
        }
    }

    @Override
    public Object getAttribute(String name) {
        Object v = super.getAttribute(name);
        if (v != null) {
            read.add(name);
        }
        return v;
    }

    /** The value without marking it read. */
    Object peek(String name) {
        return attributes.get(name);
    }

    Set<String> names() {
        return attributes.keySet();
    }

    boolean isExpiring() {
        return expiring;
    }

    boolean hasDeltas() {
        return !dirty.isEmpty() || !removed.isEmpty() || timeoutDirty;
    }

    /** The changes one flush sends, taken out of the session: what another
     *  request changes meanwhile stays for that request's own flush. */
    static final class Deltas {
        final Set<String> set = new java.util.LinkedHashSet<>();
        final Set<String> removed = new java.util.LinkedHashSet<>();
        boolean timeout;

        boolean isEmpty() {
            return set.isEmpty() && removed.isEmpty() && !timeout;
        }
    }

    /** Takes the changes to send (with the attributes read, for saveMode ALWAYS). */
    Deltas take(boolean withRead) {
        Deltas d = new Deltas();
        d.timeout = timeoutDirty;
        timeoutDirty = false;
        for (String n : dirty) {
            if (dirty.remove(n)) {
                d.set.add(n);
            }
        }
        for (String n : removed) {
            if (removed.remove(n)) {
                d.removed.add(n);
            }
        }
        for (String n : read) {
            if (read.remove(n) && withRead && !d.removed.contains(n)) {
                d.set.add(n);
            }
        }
        return d;
    }

    /** Puts back changes that could not be sent, unless changed again since. */
    void restore(Deltas d) {
        for (String n : d.set) {
            if (!removed.contains(n)) {
                dirty.add(n);
            }
        }
        for (String n : d.removed) {
            if (!dirty.contains(n)) {
                removed.add(n);
            }
        }
        if (d.timeout) {
            timeoutDirty = true;
        }
    }

    /** Serializes this session's flushes on this node, so that each applies to
     *  the version the one before produced. */
    final transient Object flushLock = new Object();

    /** Takes the sidecar's copy: its attributes and its access times. Local
     *  changes not yet flushed win over the remote values. */
    void takeRemote(RemoteSession r, Map<String, Object> values) {
        loading = true;
        try {
            for (String n : attributes.keySet()) {
                if (!values.containsKey(n) && !dirty.contains(n)) {
                    attributes.remove(n);
                }
            }
            for (Map.Entry<String, Object> e : values.entrySet()) {
                if (!dirty.contains(e.getKey()) && !removed.contains(e.getKey())) {
                    attributes.put(e.getKey(), e.getValue());
                }
            }
            takeTimes(r);
        } finally {
            loading = false;
        }
    }

    /** Takes the sidecar's access times and timeout only (not the attributes). */
    void takeTimes(RemoteSession r) {
        loading = true;
        try {
            creationTime = r.createdMs;
            if (r.lastAccessedMs > lastAccessedTime) {
                lastAccessedTime = r.lastAccessedMs;
            }
            if (r.lastAccessedMs > thisAccessedTime) {
                thisAccessedTime = r.lastAccessedMs;
            }
            if (r.maxInactiveSeconds > 0 && !timeoutDirty) {
                maxInactiveInterval = r.maxInactiveSeconds;
            }
        } finally {
            loading = false;
        }
    }

    @Override
    public void setMaxInactiveInterval(int interval) {
        boolean changed = interval != maxInactiveInterval;
        super.setMaxInactiveInterval(interval);
        if (changed && !loading) {
            timeoutDirty = true;
        }
    }

    @Override
    public void access() {
        super.access();
        servedHereMs = System.currentTimeMillis();
    }

    /** Expiry is the sidecar's: a session idle here may be in use on another
     *  member. A copy idle here for half its timeout is checked with the
     *  sidecar (Manager.checkCopy): expired there, it expires here with
     *  sessionDestroyed; served since by another member, or invalidated, the
     *  copy is dropped silently. During a request the valve's fresh read has
     *  already decided. */
    @Override
    public boolean isValid() {
        if (!isValid) {
            return false;
        }
        if (expiring || maxInactiveInterval <= 0 || pendingCreate) {
            return isValid;
        }
        SessionMeshManager m = (SessionMeshManager) manager;
        long halfMs = Math.max(1000L, maxInactiveInterval * 500L);
        if (m.inRequest() || getIdleTimeInternal() < halfMs) {
            return isValid;
        }
        switch (m.checkCopy(this)) {
            case EXPIRED:
                expire(true);
                break;
            case MOVED:
            case INVALIDATED:
                m.dropCopy(this);
                isValid = false;
                break;
            default:
                break;
        }
        return isValid;
    }
}
