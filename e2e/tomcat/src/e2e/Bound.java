package e2e;

import jakarta.servlet.http.HttpSessionActivationListener;
import jakarta.servlet.http.HttpSessionBindingEvent;
import jakarta.servlet.http.HttpSessionBindingListener;
import jakarta.servlet.http.HttpSessionEvent;
import java.io.Serializable;

/** A session attribute that records binding and activation events. */
public class Bound implements Serializable, HttpSessionBindingListener, HttpSessionActivationListener {
    private static final long serialVersionUID = 1L;

    @Override
    public void valueBound(HttpSessionBindingEvent e) {
        Events.add("bound:" + e.getName());
    }

    @Override
    public void valueUnbound(HttpSessionBindingEvent e) {
        Events.add("unbound:" + e.getName());
    }

    @Override
    public void sessionWillPassivate(HttpSessionEvent se) {
        Events.add("passivate");
    }

    @Override
    public void sessionDidActivate(HttpSessionEvent se) {
        Events.add("activate");
    }
}
