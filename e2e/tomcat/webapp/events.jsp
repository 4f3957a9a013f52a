<%@ page contentType="application/json" session="false" %><%= e2e.Events.drain() %>
