package io.sessionmesh.tomcat;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;

import java.io.IOException;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import org.junit.Test;

/** Group commit: writes that arrive while a batch is under way go together in
 *  the next one, and every request gets its own write's result. */
public class GroupCommitTest {
    /** A stand-in for the sidecar: records each batch's ids; the first batch
     *  waits for {@code release}; a batch naming "FAIL" fails in transport. */
    private static final class Recorder implements GroupCommit.Sender {
        final List<List<String>> batches = new CopyOnWriteArrayList<>();
        final CountDownLatch inFirst = new CountDownLatch(1);
        final CountDownLatch release = new CountDownLatch(1);

        @Override
        public List<Object> send(List<SidecarClient.BatchWrite> writes) throws IOException {
            List<String> ids = new ArrayList<>();
            for (SidecarClient.BatchWrite w : writes) {
                ids.add(w.id);
            }
            batches.add(ids);
            if (batches.size() == 1) {
                inFirst.countDown();
                try {
                    assertTrue(release.await(10, TimeUnit.SECONDS));
                } catch (InterruptedException e) {
                    throw new IOException(e);
                }
            }
            if (ids.contains("FAIL")) {
                throw new IOException("connection reset");
            }
            List<Object> out = new ArrayList<>();
            for (String id : ids) {
                out.add(id.startsWith("GONE") ? new SidecarClient.Refused(410, "invalidated")
                    : new SidecarClient.Written("\"p-" + id + "\"", "\"e-" + id + "\""));
            }
            return out;
        }
    }

    private static Thread submit(GroupCommit g, String id, Map<String, Object> results) throws IOException {
        SidecarClient.BatchWrite w = SidecarClient.BatchWrite.patch(id, Map.of(), List.of(), null);
        Thread t = new Thread(() -> {
            try {
                results.put(id, g.submit(w).etag);
            } catch (IOException e) {
                results.put(id, e);
            }
        });
        t.start();
        return t;
    }

    private static void waitQueued(GroupCommit g, int n) throws InterruptedException {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
        while (g.queued() < n) {
            assertTrue("only " + g.queued() + " of " + n + " writes queued in time",
                System.nanoTime() < deadline);
            Thread.sleep(1);
        }
    }

    /** Submits "A", held in the sender; then {@code ids}, in this order, while
     *  it is held; releases it; the results once every thread is done. */
    private static Map<String, Object> whileFirstHeld(GroupCommit g, Recorder r, List<String> ids)
        throws Exception {
        Map<String, Object> results = new ConcurrentHashMap<>();
        List<Thread> threads = new ArrayList<>();
        threads.add(submit(g, "A", results));
        assertTrue(r.inFirst.await(10, TimeUnit.SECONDS));
        for (String id : ids) {
            threads.add(submit(g, id, results));
            waitQueued(g, threads.size() - 1);
        }
        r.release.countDown();
        for (Thread t : threads) {
            t.join(10_000);
        }
        assertEquals(ids.size() + 1, results.size());
        return results;
    }

    @Test
    public void writesArrivingDuringABatchGoTogetherAndEachGetsItsOwnResult() throws Exception {
        Recorder r = new Recorder();
        GroupCommit g = new GroupCommit(r, 64, 1 << 20);
        Map<String, Object> results = whileFirstHeld(g, r, List.of("B", "C", "GONE1", "D"));
        assertEquals(2, r.batches.size());
        assertEquals(List.of("A"), r.batches.get(0));
        assertEquals(List.of("B", "C", "GONE1", "D"), r.batches.get(1));
        assertEquals("\"e-A\"", results.get("A"));
        assertEquals("\"e-B\"", results.get("B"));
        assertEquals("\"e-D\"", results.get("D"));
        assertTrue(results.get("GONE1") instanceof SidecarClient.Refused);
        assertEquals(410, ((SidecarClient.Refused) results.get("GONE1")).status);
        assertEquals(2, g.batches());
        assertEquals(5, g.writes());
        assertEquals(0, g.queued());
    }

    @Test
    public void aBatchIsBoundedAndATransportFailureReachesEveryWriteInIt() throws Exception {
        Recorder r = new Recorder();
        GroupCommit g = new GroupCommit(r, 2, 1 << 20);
        Map<String, Object> results = whileFirstHeld(g, r, List.of("B", "FAIL", "C"));
        assertEquals(List.of(List.of("A"), List.of("B", "FAIL"), List.of("C")), r.batches);
        assertEquals("\"e-A\"", results.get("A"));
        assertTrue(results.get("B") instanceof IOException);
        assertTrue(results.get("FAIL") instanceof IOException);
        assertEquals("\"e-C\"", results.get("C"));
    }

    @Test
    public void aWriteAloneIsSentAtOnce() throws Exception {
        List<Integer> sizes = new CopyOnWriteArrayList<>();
        GroupCommit g = new GroupCommit(ws -> {
            sizes.add(ws.size());
            List<Object> out = new ArrayList<>();
            ws.forEach(w -> out.add(new SidecarClient.Written(null, "\"x\"")));
            return out;
        }, 64, 1 << 20);
        for (int i = 0; i < 3; i++) {
            assertEquals("\"x\"", g.submit(SidecarClient.BatchWrite.touch("T" + i)).etag);
        }
        assertEquals(List.of(1, 1, 1), sizes);
    }
}
