// Package raftlog adapts zap to the hclog.Logger interface that
// hashicorp/raft logs through, so every line of the process goes through one
// structured logger.
package raftlog

import (
	"fmt"
	"io"
	"log"
	"strings"

	"github.com/hashicorp/go-hclog"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Logger is an hclog.Logger writing to a zap logger.
type Logger struct {
	z     *zap.Logger
	name  string
	args  []interface{}
	level hclog.Level
}

// New returns an hclog.Logger that writes to z. Raft's Info lines are
// chatty per heartbeat failure; they keep their level and zap filters them.
func New(z *zap.Logger) hclog.Logger {
	return &Logger{z: z, level: hclog.Trace}
}

// fields turns hclog's alternating key/value args into zap fields.
func fields(args []interface{}) []zap.Field {
	out := make([]zap.Field, 0, len(args)/2+1)
	for i := 0; i < len(args); i += 2 {
		if i+1 >= len(args) {
			out = append(out, zap.Any("extra", args[i]))
			break
		}
		key, ok := args[i].(string)
		if !ok {
			key = fmt.Sprint(args[i])
		}
		key = strings.ReplaceAll(key, "-", "_")
		out = append(out, zap.Any(key, args[i+1]))
	}
	return out
}

// Log writes one line at level.
func (l *Logger) Log(level hclog.Level, msg string, args ...interface{}) {
	if level < l.level {
		return
	}
	all := append(append([]interface{}{}, l.args...), args...)
	f := fields(all)
	switch level {
	case hclog.Trace, hclog.Debug:
		l.z.Debug(msg, f...)
	case hclog.Info, hclog.NoLevel, hclog.DefaultLevel:
		l.z.Info(msg, f...)
	case hclog.Warn:
		l.z.Warn(msg, f...)
	default:
		l.z.Error(msg, f...)
	}
}

// Trace logs at trace level (zap debug).
func (l *Logger) Trace(msg string, args ...interface{}) { l.Log(hclog.Trace, msg, args...) }

// Debug logs at debug level.
func (l *Logger) Debug(msg string, args ...interface{}) { l.Log(hclog.Debug, msg, args...) }

// Info logs at info level.
func (l *Logger) Info(msg string, args ...interface{}) { l.Log(hclog.Info, msg, args...) }

// Warn logs at warn level.
func (l *Logger) Warn(msg string, args ...interface{}) { l.Log(hclog.Warn, msg, args...) }

// Error logs at error level.
func (l *Logger) Error(msg string, args ...interface{}) { l.Log(hclog.Error, msg, args...) }

func (l *Logger) enabled(level zapcore.Level) bool { return l.z.Core().Enabled(level) }

// IsTrace reports whether trace lines are written.
func (l *Logger) IsTrace() bool { return l.enabled(zapcore.DebugLevel) }

// IsDebug reports whether debug lines are written.
func (l *Logger) IsDebug() bool { return l.enabled(zapcore.DebugLevel) }

// IsInfo reports whether info lines are written.
func (l *Logger) IsInfo() bool { return l.enabled(zapcore.InfoLevel) }

// IsWarn reports whether warn lines are written.
func (l *Logger) IsWarn() bool { return l.enabled(zapcore.WarnLevel) }

// IsError reports whether error lines are written.
func (l *Logger) IsError() bool { return l.enabled(zapcore.ErrorLevel) }

// ImpliedArgs returns the args added with With.
func (l *Logger) ImpliedArgs() []interface{} { return l.args }

// With returns a logger that adds args to every line.
func (l *Logger) With(args ...interface{}) hclog.Logger {
	c := *l
	c.args = append(append([]interface{}{}, l.args...), args...)
	return &c
}

// Name returns the logger's name.
func (l *Logger) Name() string { return l.name }

// Named returns a sub-logger.
func (l *Logger) Named(name string) hclog.Logger {
	c := *l
	c.z = l.z.Named(name)
	if l.name != "" {
		name = l.name + "." + name
	}
	c.name = name
	return &c
}

// ResetNamed returns a logger with exactly this name.
func (l *Logger) ResetNamed(name string) hclog.Logger { return l.Named(name) }

// SetLevel sets the lowest level written.
func (l *Logger) SetLevel(level hclog.Level) { l.level = level }

// GetLevel returns the lowest level written.
func (l *Logger) GetLevel() hclog.Level { return l.level }

// StandardLogger returns a log.Logger writing through this logger.
func (l *Logger) StandardLogger(opts *hclog.StandardLoggerOptions) *log.Logger {
	return log.New(l.StandardWriter(opts), "", 0)
}

// StandardWriter returns a writer whose lines become info lines.
func (l *Logger) StandardWriter(*hclog.StandardLoggerOptions) io.Writer {
	return writerFunc(func(p []byte) (int, error) {
		l.Info(strings.TrimSpace(string(p)))
		return len(p), nil
	})
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
