<%@ page contentType="application/json" session="false" import="java.lang.management.ManagementFactory,javax.management.MBeanServer,javax.management.ObjectName" %><%
// The Manager's counters as JMX clients (jconsole, Prometheus' JMX exporter) read them.
MBeanServer mbs = ManagementFactory.getPlatformMBeanServer();
ObjectName n = mbs.queryNames(new ObjectName("Catalina:type=Manager,*"), null).iterator().next();
%>{"name":"<%= n %>","activeSessions":<%= mbs.getAttribute(n, "activeSessions") %>,"replicationErrors":<%= mbs.getAttribute(n, "replicationErrors") %>,"degradedRequests":<%= mbs.getAttribute(n, "degradedRequests") %>,"remoteReads":<%= mbs.getAttribute(n, "remoteReads") %>,"notModifiedReads":<%= mbs.getAttribute(n, "notModifiedReads") %>,"sidecarReachable":<%= mbs.getAttribute(n, "sidecarReachable") %>,"expiredSessions":<%= mbs.getAttribute(n, "expiredSessions") %>}
