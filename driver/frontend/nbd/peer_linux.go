package nbd

import (
	"fmt"
	"net"
	"syscall"
)

// peerCred returns "pid=P uid=U" of the process at the other end of uc, or
// "" if the kernel does not say.
func peerCred(uc *net.UnixConn) string {
	rc, err := uc.SyscallConn()
	if err != nil {
		return ""
	}
	var cred *syscall.Ucred
	var credErr error
	if err := rc.Control(func(fd uintptr) {
		cred, credErr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil || credErr != nil {
		return ""
	}
	return fmt.Sprintf("pid=%d uid=%d", cred.Pid, cred.Uid)
}
