<%@ page contentType="application/json" %><%
session.setAttribute("bound", new e2e.Bound());
%>{"node":"<%= System.getProperty("node", String.valueOf(System.getenv("HOSTNAME"))) %>"}
