<%@ page contentType="application/json" %><%
request.changeSessionId(); // session fixation protection, as a login should
if (request.getParameter("ttl") != null) { session.setMaxInactiveInterval(Integer.parseInt(request.getParameter("ttl"))); }
session.setAttribute("user", request.getParameter("user"));
session.setAttribute("visits", Integer.valueOf(0));
%>{"user":"<%= session.getAttribute("user") %>","node":"<%= System.getProperty("node", String.valueOf(System.getenv("HOSTNAME"))) %>"}
