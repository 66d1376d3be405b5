package nbd

import (
	"math/bits"
	"sync"
)

// Request buffers are pooled by power-of-two payload size. Each buffer has
// replyHeaderLen bytes of headroom, so a READ reply (header + data) leaves in
// one write and a WRITE's payload sits behind the header of its reply.
var bufPools [maxBufClass + 1]sync.Pool

// maxBufClass is the largest pooled payload, 1<<maxBufClass bytes; it bounds
// Options.MaxRequestBytes.
const maxBufClass = 30

// bufClass returns the pool index for a payload of n bytes: ceil(log2(n)).
func bufClass(n uint32) int {
	if n <= 1 {
		return 0
	}
	return bits.Len32(n - 1)
}

// getBuffer returns a buffer of len replyHeaderLen+n. n must not exceed
// 1<<maxBufClass.
func getBuffer(n uint32) *[]byte {
	c := bufClass(n)
	if p, ok := bufPools[c].Get().(*[]byte); ok {
		*p = (*p)[:replyHeaderLen+int(n)]
		return p
	}
	b := make([]byte, replyHeaderLen+int(n), replyHeaderLen+1<<c)
	return &b
}

// putBuffer returns a buffer from getBuffer to its pool.
func putBuffer(p *[]byte) {
	c := bits.TrailingZeros(uint(cap(*p) - replyHeaderLen))
	if c > maxBufClass || cap(*p)-replyHeaderLen != 1<<c {
		panic("BUG: nbd: putBuffer of a buffer not from getBuffer")
	}
	bufPools[c].Put(p)
}
