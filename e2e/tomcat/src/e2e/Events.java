package e2e;

import jakarta.servlet.http.HttpSessionAttributeListener;
import jakarta.servlet.http.HttpSessionBindingEvent;
import jakarta.servlet.http.HttpSessionEvent;
import jakarta.servlet.http.HttpSessionIdListener;
import jakarta.servlet.http.HttpSessionListener;
import java.util.ArrayList;
import java.util.List;

/** Records the session events of this Tomcat for the end-to-end tests
 *  (events.jsp returns and clears them). No session ids are recorded. */
public class Events implements HttpSessionListener, HttpSessionAttributeListener, HttpSessionIdListener {
    private static final List<String> EVENTS = new ArrayList<>();

    static synchronized void add(String e) {
        EVENTS.add(e);
    }

    /** The events so far as a JSON array, and forgets them. */
    public static synchronized String drain() {
        StringBuilder b = new StringBuilder("[");
        for (int i = 0; i < EVENTS.size(); i++) {
            b.append(i == 0 ? "\"" : ",\"").append(EVENTS.get(i)).append('"');
        }
        EVENTS.clear();
        return b.append(']').toString();
    }

    @Override
    public void sessionCreated(HttpSessionEvent se) {
        add("created");
    }

    @Override
    public void sessionDestroyed(HttpSessionEvent se) {
        add("destroyed");
    }

    @Override
    public void sessionIdChanged(HttpSessionEvent se, String oldSessionId) {
        add("idChanged");
    }

    @Override
    public void attributeAdded(HttpSessionBindingEvent e) {
        add("added:" + e.getName());
    }

    @Override
    public void attributeRemoved(HttpSessionBindingEvent e) {
        add("removed:" + e.getName());
    }

    @Override
    public void attributeReplaced(HttpSessionBindingEvent e) {
        add("replaced:" + e.getName());
    }
}
