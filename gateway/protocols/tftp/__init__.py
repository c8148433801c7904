"""TFTP (RFC 1350, with the options of RFC 2347, 2348, 2349 and 7440): a listener whose
read requests are routed to a file source (a folder or a web server) and whose uploads are
stored and delivered to folders."""
