# syncbn-train: the data-parallel Fashion-MNIST example.
# Included from examples/CMakeLists.txt.

pkg_check_modules(OPENBLAS IMPORTED_TARGET openblas)
if(OPENBLAS_FOUND)
  set(SYNCBN_TRAIN_BLAS PkgConfig::OPENBLAS)
  message(STATUS "syncbn-train: OpenBLAS ${OPENBLAS_VERSION} via pkg-config")
else()
  find_library(SYNCBN_OPENBLAS_LIB openblas REQUIRED)
  find_path(SYNCBN_OPENBLAS_INC cblas.h PATH_SUFFIXES openblas openblas-pthread)
  add_library(syncbn_train_openblas INTERFACE)
  target_link_libraries(syncbn_train_openblas INTERFACE ${SYNCBN_OPENBLAS_LIB})
  target_include_directories(syncbn_train_openblas INTERFACE ${SYNCBN_OPENBLAS_INC})
  set(SYNCBN_TRAIN_BLAS syncbn_train_openblas)
  message(STATUS "syncbn-train: OpenBLAS ${SYNCBN_OPENBLAS_LIB}")
endif()

# Everything except main(), so that tests can link the same layers, model and loader.
add_library(syncbn_train_core STATIC
  ${CMAKE_CURRENT_LIST_DIR}/train_util.c
  ${CMAKE_CURRENT_LIST_DIR}/train_blas.c
  ${CMAKE_CURRENT_LIST_DIR}/train_data.c
  ${CMAKE_CURRENT_LIST_DIR}/train_layers.c
  ${CMAKE_CURRENT_LIST_DIR}/train_model.c)
target_include_directories(syncbn_train_core PUBLIC ${CMAKE_CURRENT_LIST_DIR})
# clock_gettime, fsync, fileno under -std=c11
target_compile_definitions(syncbn_train_core PUBLIC _POSIX_C_SOURCE=200809L)
target_link_libraries(syncbn_train_core PUBLIC syncbn syncbn_exactsum ${SYNCBN_TRAIN_BLAS} ZLIB::ZLIB MPI::MPI_C m)

add_executable(syncbn-train ${CMAKE_CURRENT_LIST_DIR}/train_main.c)
target_link_libraries(syncbn-train PRIVATE syncbn_train_core OpenMP::OpenMP_C) # omp_set_num_threads
