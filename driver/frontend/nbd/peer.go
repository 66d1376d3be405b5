package nbd

import "net"

// remoteName names the peer of nc for logs: the peer's process for a unix
// socket (whose client end has no address), else its address.
func remoteName(nc net.Conn) string {
	if uc, ok := nc.(*net.UnixConn); ok {
		if cred := peerCred(uc); cred != "" {
			return cred
		}
	}
	if a := nc.RemoteAddr(); a != nil && a.String() != "" && a.String() != "@" {
		return a.Network() + ":" + a.String()
	}
	return "unknown"
}
