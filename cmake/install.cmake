# Installation: the library and header, a CMake package (find_package(syncbn) ->
# syncbn::syncbn), a pkg-config file (syncbn.pc), and the Python package syncbn.
# Both package files are relocatable: `cmake --install build --prefix DIR` works.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS syncbn EXPORT syncbnTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  PUBLIC_HEADER DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})

set(SYNCBN_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/syncbn)
install(EXPORT syncbnTargets NAMESPACE syncbn:: DESTINATION ${SYNCBN_CMAKE_DIR})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/syncbnConfig.cmake.in
  ${PROJECT_BINARY_DIR}/syncbnConfig.cmake INSTALL_DESTINATION ${SYNCBN_CMAKE_DIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/syncbnConfigVersion.cmake
  COMPATIBILITY SameMinorVersion) # before 1.0 a minor version may change the ABI
install(FILES ${PROJECT_BINARY_DIR}/syncbnConfig.cmake ${PROJECT_BINARY_DIR}/syncbnConfigVersion.cmake
  DESTINATION ${SYNCBN_CMAKE_DIR})

# pkg-config: Open MPI's C module is "ompi-c" on Debian; fall back to "mpi-c"/"ompi".
set(SYNCBN_PC_MPI ompi-c CACHE STRING "pkg-config module of the MPI C library, for syncbn.pc's Requires")
file(RELATIVE_PATH SYNCBN_PC_TO_PREFIX /prefix/${CMAKE_INSTALL_LIBDIR}/pkgconfig /prefix)
configure_file(${PROJECT_SOURCE_DIR}/cmake/syncbn.pc.in ${PROJECT_BINARY_DIR}/syncbn.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/syncbn.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)

# The Python package, into the prefix's site directory as the Python found here lays
# it out (Debian: lib/python3.X/dist-packages, as under /usr/local; else site-packages).
find_program(SYNCBN_PYTHON NAMES python3 PATHS /usr/bin NO_DEFAULT_PATH)
find_program(SYNCBN_PYTHON NAMES python3)
if(SYNCBN_PYTHON AND NOT SYNCBN_PYTHON_INSTALL_DIR)
  execute_process(
    COMMAND ${SYNCBN_PYTHON} -c "import sysconfig as s; n = s.get_scheme_names(); \
sch = 'posix_local' if 'posix_local' in n else 'posix_prefix'; \
p = s.get_path('purelib', sch, vars={'base': '@', 'platbase': '@'}); \
print(p.replace('@/local/', '').replace('@/', ''))"
    OUTPUT_VARIABLE _site OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
  if(_rc EQUAL 0 AND _site)
    set(SYNCBN_PYTHON_INSTALL_DIR ${_site} CACHE STRING "Python site directory, relative to the install prefix")
  endif()
endif()
if(SYNCBN_PYTHON_INSTALL_DIR)
  install(DIRECTORY ${PROJECT_SOURCE_DIR}/src/python/syncbn DESTINATION ${SYNCBN_PYTHON_INSTALL_DIR}
    PATTERN __pycache__ EXCLUDE)
else()
  message(STATUS "syncbn: no python3 found; the Python package is not installed")
endif()
