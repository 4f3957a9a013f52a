package io.sessionmesh.tomcat;

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.NotSerializableException;
import java.io.ObjectInputStream;
import java.io.ObjectOutputStream;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.concurrent.atomic.AtomicLong;
import org.apache.catalina.util.CustomObjectInputStream;
import org.apache.juli.logging.Log;
import org.apache.juli.logging.LogFactory;

/** Attribute values as the sidecar holds them: the bytes of Java
 *  serialization, opaque to it, read back with the webapp's class loader. A
 *  value that cannot be written or read is left out, with a warning, and
 *  counted in {@code errors} (the Manager's replicationErrors). */
final class Serialization {
    private static final Log log = LogFactory.getLog(SessionMeshManager.class);

    private Serialization() {
    }

    static Map<String, Object> decode(Map<String, byte[]> attrs, ClassLoader cl, AtomicLong errors) {
        Map<String, Object> out = new LinkedHashMap<>();
        for (Map.Entry<String, byte[]> e : attrs.entrySet()) {
            try (ObjectInputStream in = new CustomObjectInputStream(new ByteArrayInputStream(e.getValue()), cl)) {
                out.put(e.getKey(), in.readObject());
            } catch (IOException | ClassNotFoundException ex) {
                errors.incrementAndGet();
                log.warn("sessionmesh: attribute " + e.getKey() + " cannot be read here: " + ex);
            }
        }
        return out;
    }

    /** The value's bytes; null when it cannot be serialized (it stays on this node). */
    static byte[] encode(String name, Object value, AtomicLong errors) {
        ByteArrayOutputStream b = new ByteArrayOutputStream();
        try (ObjectOutputStream out = new ObjectOutputStream(b)) {
            out.writeObject(value);
        } catch (NotSerializableException e) {
            errors.incrementAndGet();
            log.warn("sessionmesh: attribute " + name + " is not Serializable and stays on this node: " + e);
            return null;
        } catch (IOException e) {
            errors.incrementAndGet();
            log.warn("sessionmesh: attribute " + name + " cannot be serialized: " + e);
            return null;
        }
        return b.toByteArray();
    }
}
