package io.sessionmesh.tomcat;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;

import java.util.Map;
import java.util.Set;
import org.apache.catalina.core.StandardContext;
import org.junit.Before;
import org.junit.Test;

/** Delta tracking: what a request changed is what gets sent. */
public class SessionDeltaTest {
    private SessionMeshSession s;

    @Before
    public void session() {
        SessionMeshManager m = new SessionMeshManager();
        m.setContext(new StandardContext());
        s = new SessionMeshSession(m);
        s.setValid(true);
        s.setId("ABC.node1", false);
    }

    @Test
    public void setAndRemoveAreRecordedPerAttribute() {
        s.setAttribute("user", "alice");
        s.setAttribute("cart", 3);
        assertEquals(Set.of("user", "cart"), s.dirty);
        assertTrue(s.removed.isEmpty());
        s.removeAttribute("cart");
        assertEquals(Set.of("user"), s.dirty);
        assertEquals(Set.of("cart"), s.removed);
        s.setAttribute("cart", 4); // set again after a removal: a set, not a removal
        assertEquals(Set.of("user", "cart"), s.dirty);
        assertTrue(s.removed.isEmpty());
        s.setAttribute("user", null); // null is a removal, as in the Servlet spec
        assertEquals(Set.of("cart"), s.dirty);
        assertEquals(Set.of("user"), s.removed);
        s.take(false);
        assertFalse(s.hasDeltas());
    }

    @Test
    public void readsAreRecordedForSaveModeAlwaysButPeekIsNot() {
        s.setAttribute("cart", new java.util.ArrayList<>(java.util.List.of(1)));
        s.take(false);
        assertNull(s.getAttribute("missing"));
        assertTrue(s.read.isEmpty());
        s.peek("cart");
        assertTrue(s.read.isEmpty());
        s.getAttribute("cart");
        assertEquals(Set.of("cart"), s.read);
        assertFalse("a read is not a change", s.hasDeltas());
    }

    @Test
    public void theSidecarsCopyWinsExceptForChangesNotSentYet() {
        s.setAttribute("old", "gone elsewhere");
        s.setAttribute("kept", "local");
        s.take(false);
        s.setAttribute("mine", "unsent"); // changed here, not flushed yet
        s.removeAttribute("kept");        // removed here, not flushed yet
        RemoteSession r = new RemoteSession("ABC", 1000L, 5000L, 600, 605000L, Map.of());
        s.takeRemote(r, Map.of("kept", "remote", "other", "from node2"));
        assertNull("removed on another member", s.getAttribute("old"));
        assertNull("the local removal is not undone", s.getAttribute("kept"));
        assertEquals("unsent", s.getAttribute("mine"));
        assertEquals("from node2", s.getAttribute("other"));
        assertEquals(1000L, s.getCreationTimeInternal());
        assertEquals(600, s.getMaxInactiveInterval());
        assertTrue(s.getLastAccessedTimeInternal() >= 5000L);
        // Loading is not a change of its own.
        assertEquals(Set.of("mine"), s.dirty);
        assertEquals(Set.of("kept"), s.removed);
    }

    @Test
    public void aNewTimeoutIsADeltaAndIsNotUndoneByTheSidecarsCopy() {
        s.setMaxInactiveInterval(1800);
        s.take(false);
        s.setMaxInactiveInterval(1800);
        assertFalse("unchanged", s.hasDeltas());
        s.setMaxInactiveInterval(2);
        assertTrue(s.timeoutDirty);
        s.takeRemote(new RemoteSession("ABC", 1L, 2L, 1800, 0L, Map.of()), Map.of());
        assertEquals(2, s.getMaxInactiveInterval());
        s.take(false);
        s.takeRemote(new RemoteSession("ABC", 1L, 2L, 600, 0L, Map.of()), Map.of());
        assertEquals(600, s.getMaxInactiveInterval());
        assertFalse(s.hasDeltas());
    }

    @Test
    public void takingTheTimesKeepsTheAttributes() {
        s.setAttribute("user", "alice");
        s.take(false);
        s.takeTimes(new RemoteSession("ABC", 1L, 9000L, 60, 0L, Map.of()));
        assertEquals("alice", s.getAttribute("user"));
        assertEquals(60, s.getMaxInactiveInterval());
        assertTrue(s.getLastAccessedTimeInternal() >= 9000L);
    }

    @Test
    public void aFlushTakesTheChangesAndPutsBackOnlyWhatWasNotChangedSince() {
        s.setAttribute("a", 1);
        s.setAttribute("b", 2);
        s.removeAttribute("c");
        SessionMeshSession.Deltas d = s.take(false);
        assertEquals(Set.of("a", "b"), d.set);
        assertEquals(Set.of("c"), d.removed);
        assertFalse("taken out", s.hasDeltas());
        // Another request changes the session while the delta is on its way.
        s.removeAttribute("a");
        s.setAttribute("d", 4);
        s.restore(d);
        assertEquals(Set.of("b", "d"), s.dirty);
        assertEquals(Set.of("a", "c"), s.removed);
        s.take(false);
        s.getAttribute("b");
        assertEquals("ALWAYS sends what was read", Set.of("b"), s.take(true).set);
        assertTrue(s.read.isEmpty());
    }
}
