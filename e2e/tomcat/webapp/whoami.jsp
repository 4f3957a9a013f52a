<%@ page contentType="application/json" session="false" %><%
jakarta.servlet.http.HttpSession s = request.getSession(false);
if (s == null || s.getAttribute("user") == null) {
  response.setStatus(401);
%>{"user":null,"node":"<%= System.getProperty("node", String.valueOf(System.getenv("HOSTNAME"))) %>"}<%
} else {
  int v = ((Integer) s.getAttribute("visits")) + 1;
  s.setAttribute("visits", Integer.valueOf(v));
%>{"user":"<%= s.getAttribute("user") %>","visits":<%= v %>,"node":"<%= System.getProperty("node", String.valueOf(System.getenv("HOSTNAME"))) %>","id":"<%= s.getId() %>"}<%
}
%>
