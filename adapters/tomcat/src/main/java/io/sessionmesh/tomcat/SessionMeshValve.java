package io.sessionmesh.tomcat;

import jakarta.servlet.ServletException;
import java.io.IOException;
import org.apache.catalina.Session;
import org.apache.catalina.connector.Request;
import org.apache.catalina.connector.Response;
import org.apache.catalina.valves.ValveBase;

/** Added by SessionMeshManager: reads sessions fresh once per request, binds a
 *  session that arrives with another member's jvmRoute to this one (as
 *  JvmRouteBinderValve does), and sends the request's changes afterwards.
 *  Requests for static resources (ignorePattern) pass untouched. */
public class SessionMeshValve extends ValveBase {
    private final SessionMeshManager manager;

    public SessionMeshValve(SessionMeshManager manager) {
        super(true);
        this.manager = manager;
    }

    @Override
    public void invoke(Request request, Response response) throws IOException, ServletException {
        if (manager.ignored(request.getDecodedRequestURI())) {
            getNext().invoke(request, response);
            return;
        }
        manager.beginRequest();
        try {
            rebindRoute(request);
            getNext().invoke(request, response);
        } finally {
            try {
                Session s = request.getSessionInternal(false);
                if (s instanceof SessionMeshSession) {
                    manager.flush((SessionMeshSession) s);
                }
            } finally {
                manager.endRequest();
            }
        }
    }

    private void rebindRoute(Request request) throws IOException {
        String requested = request.getRequestedSessionId();
        String route = manager.getJvmRoute();
        if (requested == null || route == null || route.isEmpty() || requested.endsWith("." + route)) {
            return;
        }
        Session s = manager.findSession(requested);
        if (s == null) {
            return;
        }
        int dot = requested.indexOf('.');
        String newId = (dot < 0 ? requested : requested.substring(0, dot)) + "." + route;
        manager.changeSessionId(s, newId);
        request.changeSessionId(newId);
    }
}
